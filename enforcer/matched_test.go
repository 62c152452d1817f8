package enforcer

import (
	"context"
	"encoding/json"
	"slices"
	"testing"

	"github.com/jonboulle/clockwork"
	"github.com/writmesh/writ/policy"
)

// TestDecisionMatchedRules: a decision names the rule that made it, on the
// first (evaluated) and the repeated (cached) request, with the cache off,
// and in its audit event.
func TestDecisionMatchedRules(t *testing.T) {
	dir := policyDir(t, `package envoy.authz

default allow := false

allow if {
	input.attributes.request.http.method == "GET"
	startswith(input.attributes.request.http.path, "/public/")
}

allow if {
	input.writ.source.service_account == "frontend"
	input.attributes.request.http.method == "POST"
}
`)
	tests := []struct {
		method, path string
		want         string
	}{
		{"GET", "/public/a", "p.rego:5 data.envoy.authz.allow"},
		{"POST", "/orders", "p.rego:10 data.envoy.authz.allow"},
		{"DELETE", "/orders", "p.rego:3 default data.envoy.authz.allow"},
	}
	for _, cache := range []int{0, -1} {
		eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir, CacheSize: cache})
		if err != nil {
			t.Fatal(err)
		}
		rec := &recorder{}
		e, err := New(Options{Engine: eng, Sink: rec, Clock: clockwork.NewRealClock()})
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range tests {
			for i := range 2 {
				_, d := e.Check(context.Background(), simpleRequest(clientID, tc.method, tc.path, nil))
				if !slices.Equal(d.MatchedRules, []string{tc.want}) {
					t.Fatalf("cache %d, %s %s, request %d (cached %v): matched %q, want %q", cache, tc.method, tc.path, i, d.Cached, d.MatchedRules, tc.want)
				}
				if i == 1 && cache == 0 && !d.Cached {
					t.Fatalf("%s %s: the second decision was not cached", tc.method, tc.path)
				}
				if got := rec.got[len(rec.got)-1].MatchedRules; !slices.Equal(got, d.MatchedRules) {
					t.Fatalf("recorded %q, returned %q", got, d.MatchedRules)
				}
				ev, err := DecisionEvent(d, nil, nil)
				if err != nil {
					t.Fatal(err)
				}
				var attrs struct {
					Matched []string `json:"matched_rules"`
				}
				if err := json.Unmarshal(ev.Attributes, &attrs); err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(attrs.Matched, []string{tc.want}) {
					t.Fatalf("audit event attributes %s", ev.Attributes)
				}
			}
		}
	}
}
