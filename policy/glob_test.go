package policy

import (
	"math/rand/v2"
	"testing"
	"unicode/utf8"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/topdown"
)

var globDelims = []*ast.Term{ast.NullTerm(), ast.ArrayTerm(), ast.ArrayTerm(ast.StringTerm("/")), ast.ArrayTerm(ast.StringTerm(".")), ast.ArrayTerm(ast.StringTerm("/"), ast.StringTerm("."))}

// opaGlob is glob.match as OPA evaluates it; ok is false on an error.
func opaGlob(pattern string, delims *ast.Term, s string) (match, ok bool) {
	var out *ast.Term
	err := topdown.GetBuiltin("glob.match")(topdown.BuiltinContext{}, []*ast.Term{ast.StringTerm(pattern), delims, ast.StringTerm(s)},
		func(t *ast.Term) error { out = t; return nil })
	if err != nil || out == nil {
		return false, false
	}
	return bool(out.Value.(ast.Boolean)), true
}

func checkGlob(t *testing.T, pattern string, delims *ast.Term, s string) bool {
	t.Helper()
	g := compileSimpleGlob(ast.StringTerm(pattern), delims)
	if g == nil || !utf8.ValidString(s) {
		return false
	}
	want, ok := opaGlob(pattern, delims, s)
	if !ok {
		t.Fatalf("pattern %q delims %v subject %q: simple, but glob.match errs", pattern, delims, s)
	}
	if got := g.match(s); got != want {
		t.Fatalf("pattern %q delims %v subject %q: %v, glob.match %v", pattern, delims, s, got, want)
	}
	return true
}

// TestSimpleGlobAgrees: on random patterns and subjects over a small
// alphabet (so that they often nearly match), the simple matcher agrees
// with glob.match wherever it takes the pattern, and it takes the common
// RBAC shapes.
func TestSimpleGlobAgrees(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 11))
	gen := func(alpha string, n int) string {
		rs := []rune(alpha)
		b := make([]rune, r.IntN(n))
		for i := range b {
			b[i] = rs[r.IntN(len(rs))]
		}
		return string(b)
	}
	taken := 0
	for range 40000 {
		if checkGlob(t, gen("ab/.*", 9), globDelims[r.IntN(len(globDelims))], gen("ab/.é", 10)) {
			taken++
		}
	}
	if taken < 10000 {
		t.Fatalf("only %d patterns were simple", taken)
	}
	for _, tc := range []struct{ p, s string }{
		{"/api/v1/svc1/*/items/*", "/api/v1/svc1/0a/items/7"},
		{"/api/v1/svc1/*/items/*", "/api/v1/svc1/0a/b/items/7"},
		{"/api/*", "/api/"},
		{"/api/*/x", "/api//x"},
	} {
		if !checkGlob(t, tc.p, globDelims[2], tc.s) {
			t.Fatalf("%q is not simple", tc.p)
		}
	}
}

// FuzzSimpleGlob: the simple matcher never disagrees with glob.match.
func FuzzSimpleGlob(f *testing.F) {
	f.Add("/api/*/items/*", uint8(2), "/api/x/items/y")
	f.Add("a*b*c", uint8(0), "axxbyyc")
	f.Fuzz(func(t *testing.T, pattern string, d uint8, s string) {
		checkGlob(t, pattern, globDelims[int(d)%len(globDelims)], s)
	})
}
