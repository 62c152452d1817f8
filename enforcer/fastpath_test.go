package enforcer

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/jonboulle/clockwork"
	"github.com/writmesh/writ/policy"
	"google.golang.org/protobuf/proto"
)

// TestCachedAndPlainEnforcersAgree: an enforcer on an engine with the
// decision cache and the residual fast path and one on a plain engine give
// the same responses, results and reasons on the same requests, for the
// shipped policies and the benchmark policy (the fast path's shape).
func TestCachedAndPlainEnforcersAgree(t *testing.T) {
	benchDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(benchDir, "rbac.rego"), []byte(benchPolicy()), 0o644); err != nil {
		t.Fatal(err)
	}
	// Twice the benchmark requests: the second pass meets warm caches.
	reqs := append(variedRequests(200), benchRequests(3000, true)...)
	reqs = append(reqs, benchRequests(3000, false)...)
	reqs = append(reqs, reqs...)
	sink := SinkFunc(func(context.Context, Decision) error { return nil })
	for _, r := range []struct {
		name, dir string
		fast      bool
	}{
		{"mesh", filepath.Join("..", "policies", "mesh"), false},
		{"rbac", filepath.Join("..", "policies", "rbac"), false},
		{"envoy-example", filepath.Join("..", "policies", "envoy-example"), false},
		{"bench", benchDir, true},
	} {
		t.Run(r.name, func(t *testing.T) {
			mk := func(size int) (*Enforcer, *policy.Engine) {
				eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: r.dir, CacheSize: size})
				if err != nil {
					t.Fatal(err)
				}
				e, err := New(Options{Engine: eng, Sink: sink, Clock: clockwork.NewRealClock()})
				if err != nil {
					t.Fatal(err)
				}
				return e, eng
			}
			cached, ceng := mk(0)
			plain, _ := mk(-1)
			allowed := 0
			for i, req := range reqs {
				cr, cd := cached.Check(context.Background(), req)
				pr, pd := plain.Check(context.Background(), req)
				if !proto.Equal(cr, pr) || cd.Result != pd.Result || cd.Reason != pd.Reason || cd.Cause != pd.Cause ||
					!slices.Equal(cd.MatchedRules, pd.MatchedRules) || cd.Path != pd.Path || cd.Source != pd.Source || cd.TraceID != pd.TraceID {
					t.Fatalf("request %d: cached %v (%s), plain %v (%s)", i, cr, cd.Reason, pr, pd.Reason)
				}
				if cd.Result == ResultAllow {
					allowed++
				}
			}
			info := ceng.Info()
			if got := info.ResidualPaths != nil; got != r.fast {
				t.Fatalf("residual fast path %v (%v), want %v", got, info.ResidualPaths, r.fast)
			}
			if r.fast && info.ResidualAnswers < uint64(len(reqs)/4) {
				t.Fatalf("the fast path answered %d of %d", info.ResidualAnswers, len(reqs))
			}
			if facts := cached.factsAnswers.Load(); r.fast && facts < uint64(len(reqs)/4) {
				t.Fatalf("%d of %d decisions were made without an input document", facts, len(reqs))
			}
			if r.fast && (allowed == 0 || allowed == len(reqs)) {
				t.Fatalf("%d of %d allowed: the requests do not exercise the policy", allowed, len(reqs))
			}
		})
	}
}
