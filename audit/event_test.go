package audit

import (
	"log/slog"
	"strings"
	"testing"
	"time"
)

func newTestLogger(b *strings.Builder) *slog.Logger {
	return slog.New(slog.NewTextHandler(b, nil))
}

func TestEventRoundTripAndTamper(t *testing.T) {
	ev := *testEvent(t, 1)
	ev.Source, ev.Seq = testSource, 7
	ev.Attributes = []byte(`{"b":1,"a":"x"}`)
	ev.Seal()
	got, err := Unmarshal(ev.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if got.Hash != ev.Hash || got.Resource != ev.Resource || !got.Time.Equal(ev.Time) {
		t.Fatalf("round trip: got %+v, want %+v", got, ev)
	}
	b := ev.Marshal()
	b[40] ^= 1
	if _, err := Unmarshal(b); err == nil {
		t.Fatal("a changed byte was not detected")
	}
}

func TestCanonicalJSON(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"sorted keys", `{"b": 1, "a": {"d": [1, 2.50], "c": "<&>"}}`, `{"a":{"c":"<&>","d":[1,2.5]},"b":1}`},
		{"empty", ``, `{}`},
		{"nul stripped", `{"a":"x\u0000y"}`, `{"a":"xy"}`},
		{"exponent", `{"n":1e2}`, `{"n":100}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CanonicalJSON([]byte(tc.in))
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
			again, _ := CanonicalJSON(got)
			if string(again) != string(got) {
				t.Fatalf("not idempotent: %s -> %s", got, again)
			}
		})
	}
}

func TestNormalizeTime(t *testing.T) {
	in := time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.FixedZone("x", 3600))
	got := NormalizeTime(in)
	if got.Nanosecond() != 123456000 || got.Location() != time.UTC {
		t.Fatalf("got %v", got)
	}
}

func TestRedactionRefusesCredentials(t *testing.T) {
	if _, err := NewRedaction([]string{"Authorization"}); err == nil {
		t.Fatal("authorization allowed")
	}
	r, err := NewRedaction([]string{"X-Request-Id"})
	if err != nil {
		t.Fatal(err)
	}
	got := r.Headers(map[string]string{"x-request-id": "1", "cookie": "secret"})
	if len(got) != 1 || got["x-request-id"] != "1" {
		t.Fatalf("got %v", got)
	}
}

// TestAttributesMatchTheRoundTrip checks that attributes built from Go
// values are byte for byte what CanonicalJSON makes of them, since the
// spool skips the second pass for them.
func TestAttributesMatchTheRoundTrip(t *testing.T) {
	in := map[string]any{
		"latency_us": int64(1234567), "big": int64(1) << 60, "f": float32(0.1), "tiny": 1e-9, "huge": 1e22,
		"s": "<a&b>\u2028\x00é", "b": true, "n": nil, "list": []any{1, "x", map[string]any{"z": 1, "a": 2}},
		"headers": map[string]string{"user-agent": "curl"}, "tags": []string{"a", "b"},
		"st": struct{ B, A int }{1, 2},
	}
	got, err := Attributes(in)
	if err != nil {
		t.Fatal(err)
	}
	again, err := CanonicalJSON(got)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(again) {
		t.Fatalf("Attributes:   %s\nround trip:   %s", got, again)
	}
	var ev Event
	if err := ev.SetAttributes(in); err != nil || !ev.attrsCanonical() {
		t.Fatalf("SetAttributes: %v %v", err, ev.attrsCanonical())
	}
	ev.Attributes = []byte(`{"b":1, "a":2}`)
	if ev.attrsCanonical() {
		t.Fatal("replaced attributes still taken as canonical")
	}
}

// TestCanonicalJSONOfInvalidUTF8 checks that Go values holding invalid
// UTF-8 or NULs encode to the same bytes as CanonicalJSON of that
// encoding, which is what verify recomputes from PostgreSQL's text.
func TestCanonicalJSONOfInvalidUTF8(t *testing.T) {
	for _, s := range []string{"bad \xff\xfe utf8", "nul\x00in", "\xff\x00", "ok"} {
		raw, err := Attributes(map[string]any{"k\xff": s, "n": []any{s}})
		if err != nil {
			t.Fatal(err)
		}
		again, err := CanonicalJSON(raw)
		if err != nil {
			t.Fatal(err)
		}
		if string(raw) != string(again) {
			t.Fatalf("%q: %s is not canonical (%s)", s, raw, again)
		}
		var ev Event
		if err := ev.SetCanonicalAttributes(map[string]string{"k": s}); err != nil {
			t.Fatal(err)
		}
		if again, _ := CanonicalJSON(ev.Attributes); string(again) != string(ev.Attributes) {
			t.Fatalf("%q: SetCanonicalAttributes gave %s, canonical %s", s, ev.Attributes, again)
		}
	}
}
