package enforcer

import (
	"context"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/writmesh/writ/policy"
)

func TestDryRunIsRecordedNeverEnforced(t *testing.T) {
	ctx := context.Background()
	active, err := policy.NewEngine(ctx, policy.Options{Dir: filepath.Join("..", "policies", "rbac")})
	if err != nil {
		t.Fatal(err)
	}
	// The candidate reads a header the active policy does not, so the
	// input must carry it for the candidate's sake.
	cand, err := policy.NewEngine(ctx, policy.Options{Dir: policyDir(t, "package envoy.authz\n\ndefault allow := false\n\nallow if input.attributes.request.http.headers[\"x-canary\"] == \"yes\"\n")})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	e, err := New(Options{Engine: active, Candidate: cand, Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name              string
		method, path      string
		canary            string
		result, candidate string
		disagrees         bool
	}{
		{"both allow", "GET", "/api/v1/users/1", "yes", ResultAllow, ResultAllow, false},
		{"candidate would deny", "GET", "/api/v1/users/1", "no", ResultAllow, ResultDeny, true},
		{"candidate would allow", "DELETE", "/api/v1/users/1", "yes", ResultDeny, ResultAllow, true},
		{"both deny", "DELETE", "/api/v1/users/1", "", ResultDeny, ResultDeny, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, d := e.Check(ctx, simpleRequest(clientID, tt.method, tt.path, map[string]string{"x-canary": tt.canary}))
			if d.Result != tt.result || (resp.GetOkResponse() != nil) != (tt.result == ResultAllow) {
				t.Fatalf("enforced %s (%v), want %s", d.Result, resp, tt.result)
			}
			dr := d.DryRun
			if dr == nil || dr.Result != tt.candidate || dr.Disagrees != tt.disagrees || dr.PolicyRevision != cand.Revision() {
				t.Fatalf("dry run %+v, want %s disagrees=%v", dr, tt.candidate, tt.disagrees)
			}
			if got := rec.got[len(rec.got)-1].DryRun; got == nil || !reflect.DeepEqual(*got, *dr) {
				t.Fatalf("recorded dry run %+v", got)
			}
		})
	}
}
