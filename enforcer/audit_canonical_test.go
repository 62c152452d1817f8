package enforcer

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"github.com/writmesh/writ/audit"
)

// TestRequestAttributesAreCanonical holds the request path's directly
// encoded attributes to audit.CanonicalJSON: if they ever differ, a
// verify would report every request event as tampered with.
func TestRequestAttributesAreCanonical(t *testing.T) {
	red, err := audit.NewRedaction(append([]string{"x-odd"}, audit.DefaultAllowedHeaders...))
	if err != nil {
		t.Fatal(err)
	}
	odd := []string{"", "plain", `quote " and \ backslash`, "<script>&amp;</script>", "tab\tnewline\ncr\r", "bell\x07 esc\x1b",
		"nul\x00inside", "form\ffeed back\bspace del\x7f", "ünïcødé 日本", "line sep \u2028 para \u2029", "bad utf8 \xff\xfe", "emoji 🙂", "/a/b?c=d&e=f#g"}
	for i, s := range odd {
		for _, dry := range []bool{false, true} {
			d := Decision{ID: "0193a4b2-7c1d-7e2f-8a3b-4c5d6e7f8091", Time: time.Now(), Source: s, Destination: s, Method: "GET",
				Path: s, RawPath: s, Protocol: s, Host: s, GRPC: i%2 == 0, Cached: i%3 == 0, Result: ResultDeny, HTTPStatus: 403,
				Reason: s, Cause: CausePolicy, Latency: time.Duration(i) * 1234567 * time.Nanosecond,
				Headers: map[string]string{"user-agent": s, "X-Odd": s + "!", "authorization": "secret", "x-request-id": odd[(i+1)%len(odd)]}}
			if i%2 == 1 {
				d.MTLS, d.PeerCertNotAfter = true, time.Date(2026, 12, 5, 22, 0, i, 999, time.FixedZone("x", 3600))
				d.MatchedRules = []string{"data.envoy.authz.allow", s}
			}
			if dry {
				d.DryRun = &DryRun{Result: ResultAllow, HTTPStatus: 200, Reason: s, PolicyRevision: s, Disagrees: true, MatchedRules: []string{s}}
			}
			ev, err := DecisionEvent(d, red, d.Headers)
			if err != nil {
				t.Fatal(err)
			}
			want, err := audit.CanonicalJSON(ev.Attributes)
			if err != nil {
				t.Fatalf("%q: %v", s, err)
			}
			if !bytes.Equal(ev.Attributes, want) {
				t.Fatalf("%q (dry run %v): attributes\n%s\nare not canonical:\n%s", s, dry, ev.Attributes, want)
			}
			// The same as the general encoder's, canonicalized.
			ref := requestAttrs{RawPath: d.RawPath, Protocol: d.Protocol, LatencyUS: d.Latency.Microseconds(), Host: d.Host, GRPC: d.GRPC,
				Cached: d.Cached, MatchedRules: d.MatchedRules, MTLS: d.MTLS, Headers: red.Headers(d.Headers)}
			if !d.PeerCertNotAfter.IsZero() {
				ref.PeerCertNotAfter = d.PeerCertNotAfter.UTC().Format(time.RFC3339)
			}
			if dry {
				ref.DryRun = &dryRunAttrs{Result: ResultAllow, HTTPStatus: 200, Reason: s, PolicyRevision: s, Disagrees: true, MatchedRules: []string{s}}
			}
			refJSON, err := json.Marshal(ref)
			if err != nil {
				t.Fatal(err)
			}
			if refJSON, err = audit.CanonicalJSON(refJSON); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ev.Attributes, refJSON) {
				t.Fatalf("%q (dry run %v): attributes\n%s\ndiffer from the general encoding:\n%s", s, dry, ev.Attributes, refJSON)
			}
			if bytes.Contains(ev.Attributes, []byte("secret")) {
				t.Fatal("a credential header reached the attributes")
			}
		}
	}
	// An empty redaction keeps no headers at all.
	ev, err := DecisionEvent(Decision{Headers: map[string]string{"user-agent": "x"}}, nil, map[string]string{"user-agent": "x"})
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := audit.CanonicalJSON(ev.Attributes); !bytes.Equal(ev.Attributes, want) || bytes.Contains(ev.Attributes, []byte("headers")) {
		t.Fatalf("attributes %s", ev.Attributes)
	}
}
