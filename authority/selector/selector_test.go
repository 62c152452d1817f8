package selector

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantErr string
	}{
		{"uid", "unix:uid:1000", ""},
		{"gid", "unix:gid:0", ""},
		{"user", "unix:user:web", ""},
		{"path", "unix:path:/usr/bin/web", ""},
		{"path with colon", "unix:path:/opt/a:b", ""},
		{"no value", "unix:uid:", "want type:key:value"},
		{"no key", "unix", "want type:key:value"},
		{"leading zero", "unix:uid:01000", "decimal"},
		{"negative", "unix:uid:-1", "decimal"},
		{"too big", "unix:uid:4294967296", "decimal"},
		{"relative path", "unix:path:bin/web", "absolute"},
		{"unknown type", "k8s:ns:default", "unknown type"},
		{"unknown key", "unix:pid:1", "unknown unix key"},
		{"control char", "unix:user:a\nb", "control characters"},
		{"too long", "unix:path:/" + strings.Repeat("a", MaxLen), "longer than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Parse(tt.in)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Parse(%q) = %v", tt.in, err)
				}
				if got := s.String(); got != tt.in {
					t.Fatalf("round trip = %q, want %q", got, tt.in)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Parse(%q) error = %v, want it to contain %q", tt.in, err, tt.wantErr)
			}
		})
	}
}

func TestParseAllRejectsDuplicatesAndSorts(t *testing.T) {
	if _, err := ParseAll([]string{"unix:uid:1", "unix:uid:1"}); err == nil {
		t.Fatal("duplicate accepted")
	}
	if _, err := ParseAll(nil); err == nil {
		t.Fatal("empty list accepted")
	}
	got, err := ParseAll([]string{"unix:uid:1", "unix:gid:2"})
	if err != nil {
		t.Fatal(err)
	}
	if got[0].String() != "unix:gid:2" {
		t.Fatalf("not sorted: %v", Strings(got))
	}
}

func TestMatches(t *testing.T) {
	uid := Selector{"unix", "uid", "1000"}
	gid := Selector{"unix", "gid", "1000"}
	other := Selector{"unix", "uid", "1001"}
	set := NewSet(uid, gid)
	if !set.Matches([]Selector{uid}) {
		t.Error("subset did not match")
	}
	if !set.Matches([]Selector{uid, gid}) {
		t.Error("equal set did not match")
	}
	if set.Matches([]Selector{uid, other}) {
		t.Error("superset matched")
	}
	if set.Matches(nil) {
		t.Error("empty requirement matched")
	}
}

// FuzzParse: Parse never panics, and what it accepts round-trips and is
// accepted again.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"unix:uid:1000", "unix:path:/a:b", "unix:user:x", "x:y", "", "unix:uid:00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		s, err := Parse(in)
		if err != nil {
			return
		}
		if s.String() != in {
			t.Fatalf("accepted %q but renders %q", in, s.String())
		}
		if _, err := Parse(s.String()); err != nil {
			t.Fatalf("re-parse of %q: %v", in, err)
		}
	})
}
