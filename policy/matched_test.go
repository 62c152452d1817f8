package policy

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"
)

const matchedPolicy = `package envoy.authz

default allow := false

allow if {
	input.attributes.source.principal == "spiffe://td/ns/a/sa/web"
	glob.match("/api/*", ["/"], input.attributes.request.http.path)
}

allow if {
	input.attributes.source.principal == "spiffe://td/ns/b/sa/admin"
	startswith(input.attributes.request.http.path, "/admin/")
}

allow if input.attributes.source.principal == "spiffe://td/ns/c/sa/root"
`

// TestMatchedRules: every answer names the rule that produced it, the
// same way on a plain evaluation, from the decision cache and from the
// residual fast path.
func TestMatchedRules(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": matchedPolicy})
	engines := map[string]*Engine{
		"plain":  newEngine(t, Options{Dir: dir, CacheSize: -1}),
		"cached": newEngine(t, Options{Dir: dir, CacheSize: 64}),
	}
	in := func(principal, path string) string {
		return `{"attributes": {"source": {"principal": "` + principal + `"}, "request": {"http": {"method": "GET", "path": "` + path + `"}}}}`
	}
	tests := []struct {
		name, input string
		want        []string
	}{
		{"first rule", in("spiffe://td/ns/a/sa/web", "/api/x"), []string{"authz.rego:5 data.envoy.authz.allow"}},
		{"second rule", in("spiffe://td/ns/b/sa/admin", "/admin/users"), []string{"authz.rego:10 data.envoy.authz.allow"}},
		{"rule without path", in("spiffe://td/ns/c/sa/root", "/anything"), []string{"authz.rego:15 data.envoy.authz.allow"}},
		{"default", in("spiffe://td/ns/a/sa/web", "/admin/users"), []string{"authz.rego:3 default data.envoy.authz.allow"}},
	}
	ctx := context.Background()
	for name, e := range engines {
		for _, tc := range tests {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				// Three times: the first fills the cache or builds the
				// residual, the others answer from it.
				for i := range 3 {
					r, err := e.Eval(ctx, input(t, tc.input))
					if err != nil {
						t.Fatal(err)
					}
					if !slices.Equal(r.Rules, tc.want) {
						t.Fatalf("eval %d (cached %v): rules %q, want %q", i, r.Cached, r.Rules, tc.want)
					}
				}
			})
		}
	}
	if engines["cached"].Info().ResidualAnswers == 0 {
		t.Fatal("the fast path never answered")
	}
}

// TestMatchedRulesAgree: on the residual corpus, the fast path names the
// same rules as a plain evaluation, and every defined answer names one.
func TestMatchedRulesAgree(t *testing.T) {
	ctx := context.Background()
	for _, tc := range residualPolicies {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, map[string]string{"authz.rego": tc.rego, "rbac/data.json": corpusData})
			plain := newEngine(t, Options{Dir: dir, CacheSize: -1})
			fast := newEngine(t, Options{Dir: dir, CacheSize: 64})
			r := rand.New(rand.NewPCG(3, 3))
			for i := range 1000 {
				in := residualInput(r, i)
				want, err := plain.Eval(ctx, in)
				if err != nil {
					continue
				}
				got, _ := fast.Eval(ctx, in)
				if want.Defined && len(want.Rules) == 0 {
					t.Fatalf("input %v: plain evaluation named no rule for %v", in, want.Value)
				}
				if !slices.Equal(got.Rules, want.Rules) {
					t.Fatalf("input %v: rules %q (cached %v), plain %q", in, got.Rules, got.Cached, want.Rules)
				}
			}
		})
	}
}

// TestEvalPathNamesRules: a query of another document than the decision
// names the rules that produced it, every contributing rule of a set, and
// none for a package.
func TestEvalPathNamesRules(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": matchedPolicy + `
reasons contains "not web" if input.attributes.source.principal != "spiffe://td/ns/a/sa/web"

reasons contains "no path" if not input.attributes.request.http.path
`})
	e := newEngine(t, Options{Dir: dir})
	ctx := context.Background()
	in := input(t, `{"attributes": {"source": {"principal": "spiffe://td/ns/c/sa/root"}, "request": {"http": {}}}}`)
	for _, tc := range []struct {
		path string
		want []string
	}{
		{"envoy/authz/allow", []string{"authz.rego:15 data.envoy.authz.allow"}},
		{"envoy/authz/reasons", []string{"authz.rego:17 data.envoy.authz.reasons", "authz.rego:19 data.envoy.authz.reasons"}},
		{"envoy/authz", nil},
	} {
		ref, err := ParseDataPath(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		r, err := e.Snapshot().EvalPath(ctx, ref, in)
		if err != nil || !r.Defined {
			t.Fatalf("%s: %+v %v", tc.path, r, err)
		}
		if !slices.Equal(r.Rules, tc.want) {
			t.Errorf("%s: rules %q, want %q", tc.path, r.Rules, tc.want)
		}
	}
}
