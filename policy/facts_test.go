package policy

import (
	"context"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"
)

// inputFacts answers Facts from an input document, as a caller that
// knows its request would.
type inputFacts struct{ in ast.Value }

func (f inputFacts) Lookup(p []string) (*ast.Term, bool) {
	t := lookup(f.in, pathTerms([][]string{p})[0])
	return t, t != nil
}

// TestEvalFactsAgrees: whenever EvalFacts answers, it gives the answer
// (value and rules) a plain engine gives for the input; it answers most
// requests once warm, and never for a set without the cache.
func TestEvalFactsAgrees(t *testing.T) {
	ctx := context.Background()
	for _, tc := range residualPolicies {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, map[string]string{"authz.rego": tc.rego, "rbac/data.json": corpusData})
			plain := newEngine(t, Options{Dir: dir, CacheSize: -1})
			fast := newEngine(t, Options{Dir: dir, CacheSize: 64})
			if _, ok := plain.Snapshot().EvalFacts(ctx, inputFacts{ast.NewObject()}); ok {
				t.Fatal("EvalFacts answered without a cache")
			}
			r := rand.New(rand.NewPCG(4, 4))
			answered := 0
			const n = 3000
			for i := range n {
				in := residualInput(r, i)
				want, werr := plain.Eval(ctx, in)
				got, ok := fast.Snapshot().EvalFacts(ctx, inputFacts{in})
				if !ok {
					_, _ = fast.Eval(ctx, in) // warms the cache and residuals, as callers do
					continue
				}
				answered++
				if werr != nil || got.Defined != want.Defined || !reflect.DeepEqual(got.Value, want.Value) || !slices.Equal(got.Rules, want.Rules) {
					t.Fatalf("input %v: facts %+v, plain %+v (%v)", in, got, want, werr)
				}
			}
			t.Logf("EvalFacts answered %d of %d", answered, n)
		})
	}
}
