package enforcer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/writmesh/writ/policy"
)

// boundPolicies are the policies of a service with several
// AuthorizationPolicies: the enforcer's own (allows everything), two
// teams' rules and one whose decision is undefined for most requests.
var boundPolicies = map[string]string{
	"own.rego": "package envoy.authz\n\ndefault allow := true\n",
	"a.rego":   "package team.a\n\ndefault allow := false\n\nallow if input.attributes.request.http.method == \"GET\"\n",
	"b.rego":   "package team.b\n\ndefault allow := false\n\nallow := {\"allowed\": true, \"headers\": {\"x-team-b\": \"ok\"}} if startswith(input.attributes.request.http.path, \"/public\")\n",
	"c.rego":   "package team.c\n\nallow if input.attributes.request.http.path == \"/only\"\n",
}

func boundDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for name, rego := range boundPolicies {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(rego), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestServerBoundDecisions: several AuthorizationPolicies enforced on one
// service (writ.authz_decision "q1,q2") allow a request only if every
// query allows; one that denies, is undefined or cannot be loaded denies
// it, naming the query. Each request is recorded once. This is the path
// of writ-enforcer (Server) and of writ-proxy (Binder.For).
func TestServerBoundDecisions(t *testing.T) {
	ctx := context.Background()
	dir := boundDir(t)
	own, err := policy.NewEngine(ctx, policy.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	base := Options{Engine: own, Sink: rec}
	e, err := New(base)
	if err != nil {
		t.Fatal(err)
	}
	made := 0
	binder := NewBinder(base, func(ctx context.Context, d string) (*policy.Engine, error) {
		made++
		return policy.NewEngine(ctx, policy.Options{Dir: dir, DecisionPath: d})
	})
	srv := NewServer(e, 0).WithBinder(binder)
	unbound := NewServer(e, 0)
	const ab = "data.team.a.allow,data.team.b.allow"
	tests := []struct {
		name, decision, mode, method, path string
		noBinder                           bool
		result, cause, reason, header      string
	}{
		{name: "own decision only", decision: "data.envoy.authz.allow", method: "DELETE", path: "/x", result: ResultAllow, cause: CausePolicy},
		{name: "both allow", decision: ab, method: "GET", path: "/public/1", result: ResultAllow, cause: CausePolicy, reason: "every bound policy allowed", header: "x-team-b"},
		{name: "second denies", decision: ab, method: "GET", path: "/private", result: ResultDeny, cause: CausePolicy, reason: "data.team.b.allow: policy denied"},
		{name: "first denies", decision: ab, method: "POST", path: "/public/1", result: ResultDeny, cause: CausePolicy, reason: "data.team.a.allow: policy denied"},
		{name: "order does not matter", decision: "data.team.b.allow,data.team.a.allow", method: "POST", path: "/public/1", result: ResultDeny, cause: CausePolicy, reason: "data.team.a.allow: policy denied"},
		{name: "undefined denies", decision: "data.team.a.allow,data.team.c.allow", method: "GET", path: "/public/1", result: ResultDeny, cause: CauseUndefined, reason: "data.team.c.allow: policy decision undefined"},
		{name: "undefined one defined", decision: "data.team.a.allow,data.team.c.allow", method: "GET", path: "/only", result: ResultAllow, cause: CausePolicy},
		{name: "with the own decision", decision: "data.envoy.authz.allow,data.team.a.allow", method: "PUT", path: "/x", result: ResultDeny, cause: CausePolicy, reason: "data.team.a.allow: policy denied"},
		{name: "missing rule denies", decision: "data.team.a.allow,data.team.none.allow", method: "GET", path: "/public/1", result: ResultDeny, cause: CausePolicyError, reason: "nothing defines decision path data.team.none.allow"},
		{name: "empty query denies", decision: "data.team.a.allow,", method: "GET", path: "/public/1", result: ResultDeny, cause: CausePolicyError, reason: "empty query"},
		{name: "dry-run records, never denies", decision: ab, mode: ModeDryRun, method: "POST", path: "/public/1", result: ResultAllow, cause: CauseDryRunMode, reason: "data.team.a.allow: policy denied"},
		{name: "no binder denies", noBinder: true, decision: ab, method: "GET", path: "/public/1", result: ResultDeny, cause: CausePolicyError, reason: "decides by data.envoy.authz.allow only"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := simpleRequest(clientID, tt.method, tt.path, nil)
			req.Attributes.ContextExtensions = map[string]string{DecisionContextKey: tt.decision}
			if tt.mode != "" {
				req.Attributes.ContextExtensions[ModeContextKey] = tt.mode
			}
			s := srv
			if tt.noBinder {
				s = unbound
			}
			n := len(rec.got)
			resp, err := s.Check(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			if len(rec.got) != n+1 {
				t.Fatalf("recorded %d decisions, want 1", len(rec.got)-n)
			}
			d := rec.got[n]
			if d.Result != tt.result || d.Cause != tt.cause || !strings.Contains(d.Reason, tt.reason) {
				t.Fatalf("got %s %s %q, want %s %s %q", d.Result, d.Cause, d.Reason, tt.result, tt.cause, tt.reason)
			}
			if (resp.GetOkResponse() != nil) != (tt.result == ResultAllow) {
				t.Fatalf("response %v does not say %s", resp, tt.result)
			}
			if tt.header != "" {
				hs := resp.GetOkResponse().GetHeaders()
				if len(hs) != 1 || hs[0].GetHeader().GetKey() != tt.header {
					t.Fatalf("allow headers %v, want %s", hs, tt.header)
				}
			}
		})
	}
	// Engines are made once per query, the own one never, and a missing
	// rule is tried once until the next reload.
	req := simpleRequest(clientID, "GET", "/", nil)
	req.Attributes.ContextExtensions = map[string]string{DecisionContextKey: "data.team.a.allow,data.team.none.allow"}
	srv.Check(ctx, req)
	if made != 4 {
		t.Errorf("made %d engines, want 4 (team.a, team.b, team.c, team.none tried once)", made)
	}
	be, err := binder.For(ctx, ab, "")
	if err != nil || be.DecisionPath() != ab {
		t.Fatalf("For(%s) = %v, %v", ab, be, err)
	}
	if err := binder.Reload(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestServerDryRunBeside: dry-run AuthorizationPolicies beside enforced
// ones (writ.authz_dry_run) are evaluated on every request and recorded
// in Decision.DryRun, never enforced: the enforced query alone decides
// the response, and what the dry-run ones would have decided, or why
// they cannot decide, is in the record.
func TestServerDryRunBeside(t *testing.T) {
	ctx := context.Background()
	dir := boundDir(t)
	own, err := policy.NewEngine(ctx, policy.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	base := Options{Engine: own, Sink: rec}
	e, err := New(base)
	if err != nil {
		t.Fatal(err)
	}
	binder := NewBinder(base, func(ctx context.Context, d string) (*policy.Engine, error) {
		return policy.NewEngine(ctx, policy.Options{Dir: dir, DecisionPath: d})
	})
	srv := NewServer(e, 0).WithBinder(binder)
	const a, b = "data.team.a.allow", "data.team.b.allow"
	tests := []struct {
		name, decision, dryRun, method, path string
		noBinder                             bool
		result, dryResult, dryReason         string
		disagrees                            bool
	}{
		{name: "enforced allows, dry run denies", decision: a, dryRun: b, method: "GET", path: "/private",
			result: ResultAllow, dryResult: ResultDeny, dryReason: "policy denied", disagrees: true},
		{name: "enforced denies, dry run allows", decision: a, dryRun: b, method: "POST", path: "/public/1",
			result: ResultDeny, dryResult: ResultAllow, disagrees: true},
		{name: "both allow", decision: a, dryRun: b, method: "GET", path: "/public/1", result: ResultAllow, dryResult: ResultAllow},
		{name: "own decision enforced", dryRun: a, method: "DELETE", path: "/x",
			result: ResultAllow, dryResult: ResultDeny, dryReason: "policy denied", disagrees: true},
		{name: "every dry-run query must allow", decision: a, dryRun: b + ",data.team.c.allow", method: "GET", path: "/public/1",
			result: ResultAllow, dryResult: ResultDeny, dryReason: "data.team.c.allow: policy decision undefined", disagrees: true},
		{name: "missing dry-run rule is recorded, not enforced", decision: a, dryRun: "data.team.none.allow", method: "GET", path: "/x",
			result: ResultAllow, dryResult: ResultDeny, dryReason: "nothing defines decision path data.team.none.allow", disagrees: true},
		{name: "no binder denies", noBinder: true, decision: a, dryRun: b, method: "GET", path: "/public/1", result: ResultDeny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := simpleRequest(clientID, tt.method, tt.path, nil)
			req.Attributes.ContextExtensions = map[string]string{ModeContextKey: "enforce", DryRunContextKey: tt.dryRun}
			if tt.decision != "" {
				req.Attributes.ContextExtensions[DecisionContextKey] = tt.decision
			}
			s := srv
			if tt.noBinder {
				s = NewServer(e, 0)
			}
			n := len(rec.got)
			resp, err := s.Check(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			if len(rec.got) != n+1 {
				t.Fatalf("recorded %d decisions, want 1", len(rec.got)-n)
			}
			d := rec.got[n]
			if d.Result != tt.result || (resp.GetOkResponse() != nil) != (tt.result == ResultAllow) {
				t.Fatalf("enforced %s %q (%v), want %s", d.Result, d.Reason, resp, tt.result)
			}
			if tt.noBinder {
				return
			}
			if len(resp.GetOkResponse().GetHeaders()) != 0 {
				t.Fatalf("dry-run policy's headers reached the response: %v", resp.GetOkResponse().GetHeaders())
			}
			dr := d.DryRun
			if dr == nil || dr.Result != tt.dryResult || dr.Disagrees != tt.disagrees || !strings.Contains(dr.Reason, tt.dryReason) || dr.PolicyRevision == "" {
				t.Fatalf("dry run %+v, want %s %q disagrees=%v", dr, tt.dryResult, tt.dryReason, tt.disagrees)
			}
		})
	}
}

// TestBinderBounds: values naming ever new queries (a peer's context
// extensions) stop being compiled and remembered at the bounds, and what
// was bound before keeps working.
func TestBinderBounds(t *testing.T) {
	ctx := context.Background()
	dir := boundDir(t)
	own, err := policy.NewEngine(ctx, policy.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	made := 0
	binder := NewBinder(Options{Engine: own, Sink: &recorder{}}, func(ctx context.Context, d string) (*policy.Engine, error) {
		made++
		return policy.NewEngine(ctx, policy.Options{Dir: dir, DecisionPath: d})
	})
	good, err := binder.For(ctx, "data.team.a.allow", "")
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("data.team.a.allow,", maxQueriesPerValue) + "data.team.b.allow"
	if _, err := binder.For(ctx, long, ""); err == nil || !strings.Contains(err.Error(), "queries, over") {
		t.Fatalf("a list of %d queries: %v, want refused", maxQueriesPerValue+1, err)
	}
	for i := range maxBindings + 50 {
		_, err := binder.For(ctx, fmt.Sprintf("data.nothing%d.allow", i), "")
		if err == nil {
			t.Fatalf("query %d that nothing defines was bound", i)
		}
	}
	// The good binding and the refused long list count; everything past
	// the bound was refused before compiling.
	if made > maxBindings {
		t.Fatalf("%d engines compiled for %d distinct values, want at most %d", made, maxBindings+50, maxBindings)
	}
	if _, err := binder.For(ctx, "data.nothing999.allow", ""); err == nil || !strings.Contains(err.Error(), "already held") {
		t.Fatalf("past the bound: %v, want refused as held", err)
	}
	if e, err := binder.For(ctx, "data.team.a.allow", ""); err != nil || e != good {
		t.Fatalf("the binding made before the flood: %v, %v", e, err)
	}
}

// TestDecisionPathMadeOnce: Server.Check compares every request's
// writ.authz_decision with DecisionPath, so it is the joined queries
// made at New, not a copy of each engine's path printed per call.
func TestDecisionPathMadeOnce(t *testing.T) {
	ctx := context.Background()
	dir := boundDir(t)
	var engs []*policy.Engine
	for _, d := range []string{"data.envoy.authz.allow", "data.team.a.allow", "data.team.b.allow"} {
		eng, err := policy.NewEngine(ctx, policy.Options{Dir: dir, DecisionPath: d})
		if err != nil {
			t.Fatal(err)
		}
		engs = append(engs, eng)
	}
	e, err := New(Options{Engine: engs[0], Also: engs[1:], Sink: &recorder{}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := e.DecisionPath(), "data.envoy.authz.allow,data.team.a.allow,data.team.b.allow"; got != want {
		t.Fatalf("DecisionPath() = %q, want %q", got, want)
	}
	if n := testing.AllocsPerRun(100, func() { _ = e.DecisionPath() }); n != 0 {
		t.Fatalf("DecisionPath allocates %v times per call, want 0", n)
	}
}
