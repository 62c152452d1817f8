package enforcer

import (
	"context"
	"path/filepath"
	"reflect"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

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

// TestDryRunModeNeverDenies: with the dry-run mode context extension (an
// AuthorizationPolicy in mode dry-run) a policy denial is recorded as
// what the policy would have done and the request is allowed; allows and
// refused paths are unchanged, and without the extension it denies.
func TestDryRunModeNeverDenies(t *testing.T) {
	ctx := context.Background()
	eng, err := policy.NewEngine(ctx, policy.Options{Dir: policyDir(t, "package envoy.authz\n\ndefault allow := false\n\nallow if input.attributes.request.http.method == \"GET\"\n")})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	e, err := New(Options{Engine: eng, Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	dry := func(method, path string) *authv3.CheckRequest {
		req := simpleRequest(clientID, method, path, nil)
		req.Attributes.ContextExtensions = map[string]string{ModeContextKey: ModeDryRun}
		return req
	}
	tests := []struct {
		name   string
		req    *authv3.CheckRequest
		result string
		cause  string
		policy string // the recorded dry-run answer, "" for none
	}{
		{"dry-run deny allowed", dry("DELETE", "/x"), ResultAllow, CauseDryRunMode, ResultDeny},
		{"dry-run allow", dry("GET", "/x"), ResultAllow, CausePolicy, ""},
		{"dry-run bad path", dry("GET", "/a%2Fb"), ResultDeny, CauseBadPath, ""},
		{"enforced deny", simpleRequest(clientID, "DELETE", "/x", nil), ResultDeny, CausePolicy, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, d := e.Check(ctx, tt.req)
			if d.Result != tt.result || d.Cause != tt.cause || (resp.GetOkResponse() != nil) != (tt.result == ResultAllow) {
				t.Fatalf("got %s/%s (%v), want %s/%s", d.Result, d.Cause, resp, tt.result, tt.cause)
			}
			got := rec.got[len(rec.got)-1]
			if got.ID != d.ID || got.Result != d.Result {
				t.Fatalf("recorded %+v, returned %+v", got, d)
			}
			switch {
			case tt.policy == "" && got.DryRun != nil:
				t.Fatalf("dry run recorded: %+v", got.DryRun)
			case tt.policy != "" && (got.DryRun == nil || got.DryRun.Result != tt.policy || !got.DryRun.Disagrees || got.DryRun.HTTPStatus != 403):
				t.Fatalf("dry run %+v, want the policy's %s", got.DryRun, tt.policy)
			}
		})
	}
}
