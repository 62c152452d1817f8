package policy

import (
	"context"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"
)

// residualPolicies are boolean policies of the shapes the residual fast
// path takes, and some it must leave to the full evaluation.
var residualPolicies = []struct {
	name string
	rego string
	// residual: the input paths the fast path evaluates per request, nil
	// when the set must have no fast path.
	residual []string
}{
	{"rules from data", `package envoy.authz

default allow := false

allow if {
	some rule in data.rbac.rules
	rule.principal == input.attributes.source.principal
	rule.method == input.attributes.request.http.method
	glob.match(rule.path, ["/"], input.attributes.request.http.path)
}
`, []string{"input.attributes.request.http.path"}},
	{"constant rules, several builtins, no default", `package envoy.authz

allow if {
	input.attributes.source.principal == "spiffe://td/ns/a/sa/web"
	input.attributes.request.http.method == "GET"
	glob.match("/api/v1/users/*/orders/*", ["/"], input.attributes.request.http.path)
}

allow if {
	input.attributes.source.principal == "spiffe://td/ns/b/sa/admin"
	startswith(input.attributes.request.http.path, "/admin/")
	not endswith(input.attributes.request.http.path, "/secret")
}

allow if {
	input.attributes.source.principal == "spiffe://td/ns/b/sa/admin"
	input.attributes.request.http.method == "DELETE"
	glob.match("/api/v1/users/*", null, input.attributes.request.http.path)
}

allow if input.attributes.source.principal == "spiffe://td/ns/c/sa/other"
`, []string{"input.attributes.request.http.path"}},
	{"path compared by equality", `package envoy.authz

default allow := false

allow if {
	input.attributes.source.principal == "spiffe://td/ns/a/sa/web"
	input.attributes.request.http.path == "/api/v1/users/1"
}

allow if {
	glob.match("/admin/**", ["/"], input.attributes.request.http.path)
}
`, nil},
	{"object decision", corpusPolicy, nil},
	{"path read whole elsewhere", `package envoy.authz

default allow := false

allow if {
	glob.match("/api/**", ["/"], input.attributes.request.http.path)
	count(input.attributes.request.http) > 1
}
`, nil},
}

// residualInput is corpusInput with some paths missing or not strings.
func residualInput(r *rand.Rand, i int) ast.Value {
	in := corpusInput(r, i)
	http := lookup(in, pathTerms([][]string{{"attributes", "request", "http"}})[0]).Value.(ast.Object)
	switch r.IntN(12) {
	case 0:
		// No path: rebuild without it.
		o := ast.NewObject()
		http.Foreach(func(k, v *ast.Term) {
			if !k.Equal(ast.StringTerm("path")) {
				o.Insert(k, v)
			}
		})
		in = ast.NewObject(ast.Item(ast.StringTerm("attributes"), ast.ObjectTerm(
			ast.Item(ast.StringTerm("request"), ast.ObjectTerm(ast.Item(ast.StringTerm("http"), ast.NewTerm(o)))),
			ast.Item(ast.StringTerm("source"), ast.ObjectTerm(ast.Item(ast.StringTerm("principal"), ast.StringTerm("spiffe://td/ns/a/sa/web")))),
		)))
	case 1:
		http.Insert(ast.StringTerm("path"), ast.NumberTerm("7")) // replaces the path
	case 2:
		http.Insert(ast.StringTerm("path"), ast.StringTerm("/admin/x/secret"))
	}
	return in
}

// TestResidualFastPathAgrees: for every policy, an engine with the fast
// path (and the decision cache) and a plain engine give the same answers,
// or the same errors, on a generated corpus; the fast path is on exactly
// for the shapes it understands, and answers most requests there.
func TestResidualFastPathAgrees(t *testing.T) {
	ctx := context.Background()
	for _, tc := range residualPolicies {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, map[string]string{"authz.rego": tc.rego, "rbac/data.json": corpusData})
			plain := newEngine(t, Options{Dir: dir, CacheSize: -1})
			fast := newEngine(t, Options{Dir: dir, CacheSize: 64})
			if got := fast.Info().ResidualPaths; !reflect.DeepEqual(got, tc.residual) {
				t.Fatalf("residual paths %v, want %v", got, tc.residual)
			}
			if plain.Info().ResidualPaths != nil {
				t.Fatal("the fast path is on with the cache off")
			}
			r := rand.New(rand.NewPCG(3, 3))
			const n = 4000
			outcomes := map[string]int{}
			for i := range n {
				in := residualInput(r, i)
				want, werr := plain.Eval(ctx, in)
				got, gerr := fast.Eval(ctx, in)
				if (werr == nil) != (gerr == nil) {
					t.Fatalf("input %v: error %v with the fast path, %v without", in, gerr, werr)
				}
				if got.Defined != want.Defined || !reflect.DeepEqual(got.Value, want.Value) {
					t.Fatalf("input %v: fast path %+v, plain %+v", in, got, want)
				}
				outcomes[fmt.Sprintf("%v/%v/%v", want.Defined, want.Value, werr != nil)]++
			}
			if len(outcomes) < 2 {
				t.Fatalf("outcomes %v: the corpus does not exercise the policy", outcomes)
			}
			answered := fast.Info().ResidualAnswers
			if tc.residual != nil && answered < n/2 {
				t.Fatalf("the fast path answered %d of %d", answered, n)
			}
			t.Logf("outcomes %v, fast path answered %d", outcomes, answered)
		})
	}
}

// TestResidualFastPathConcurrent: goroutines sharing an engine whose
// residuals are built while they evaluate get the answers a plain engine
// gives (run with -race).
func TestResidualFastPathConcurrent(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": residualPolicies[0].rego, "rbac/data.json": corpusData})
	plain := newEngine(t, Options{Dir: dir, CacheSize: -1})
	fast := newEngine(t, Options{Dir: dir, CacheSize: 64})
	ctx := context.Background()
	r := rand.New(rand.NewPCG(5, 5))
	ins := make([]ast.Value, 2000)
	want := make([]Result, len(ins))
	for i := range ins {
		ins[i] = residualInput(r, i)
		want[i], _ = plain.Eval(ctx, ins[i])
	}
	errs := make(chan error, 4)
	for w := range 4 {
		go func() {
			for i := w; i < len(ins); i += 2 {
				got, _ := fast.Eval(ctx, ins[i%len(ins)])
				if got.Defined != want[i].Defined || !reflect.DeepEqual(got.Value, want[i].Value) {
					errs <- fmt.Errorf("input %v: fast %+v, plain %+v", ins[i], got, want[i])
					return
				}
			}
			errs <- nil
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if fast.Info().ResidualAnswers == 0 {
		t.Fatal("the fast path never answered")
	}
}

// TestResidualNotPoisonedByCancellation: a request cancelled while its
// residual was being computed leaves no entry behind, so the next request
// with the same known inputs still takes the fast path.
func TestResidualNotPoisonedByCancellation(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": residualPolicies[0].rego, "rbac/data.json": corpusData})
	e := newEngine(t, Options{Dir: dir, CacheSize: 64})
	in := input(t, `{"attributes": {"source": {"principal": "spiffe://td/ns/a/sa/web"}, "request": {"http": {"method": "GET", "path": "/api/v1/users/1/orders/2"}}}}`)
	set := e.cur.Load()
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	if _, ok := set.fast.eval(cancelled, in, set.revision); ok {
		t.Fatal("a cancelled evaluation answered from the fast path")
	}
	r, ok := set.fast.eval(context.Background(), in, set.revision)
	if !ok || r.Value != true {
		t.Fatalf("after a cancelled one: %+v, %v; want true from the fast path", r, ok)
	}
}
