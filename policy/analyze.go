package policy

import (
	"strings"

	"github.com/open-policy-agent/opa/v1/ast"
)

// nondeterministicPrefixes name builtins whose result may differ between two
// evaluations on the same input and data: they read the clock, randomness,
// the network or the runtime. OPA marks some builtins Nondeterministic; this
// list adds the ones that read the clock without being marked (JWT and X.509
// verification check expiry against now).
var nondeterministicPrefixes = []string{
	"time.now_ns",
	"http.send",
	"net.lookup_ip_addr",
	"rand.",
	"uuid.",
	"opa.runtime",
	"io.jwt.decode_verify",
	"io.jwt.encode_sign",
	"crypto.x509.parse_and_verify_certificates",
	"providers.",
}

// analysis is what the decision cache needs to know about a compiled policy
// set.
type analysis struct {
	// deterministic is false when any module calls a builtin that may
	// answer differently for the same input and data.
	deterministic bool
	// nondeterministic names the first offending builtin, for logs.
	nondeterministic string
	// wholeInput is true when some reference to input cannot be reduced to
	// a constant path (input itself, input[x], input passed to a function,
	// a `with input` override): the cache then keys on the whole input.
	wholeInput bool
	// paths are the constant string paths under input that the modules
	// read, minimal (no path is a prefix of another). Every read of input
	// is under one of them.
	paths [][]string
}

// analyse walks the compiled modules. It is deliberately conservative:
// anything it does not understand widens the key, never narrows it.
func analyse(mods map[string]*ast.Module) analysis {
	a := analysis{deterministic: true}
	var raw [][]string
	inputVar := ast.InputRootDocument.Value.(ast.Var)

	noteCall := func(name string) {
		if !a.deterministic {
			return
		}
		if b, ok := ast.BuiltinMap[name]; ok && b.Nondeterministic {
			a.deterministic, a.nondeterministic = false, name
			return
		}
		for _, p := range nondeterministicPrefixes {
			if strings.HasPrefix(name, p) {
				a.deterministic, a.nondeterministic = false, name
				return
			}
		}
	}

	var vis *ast.GenericVisitor
	vis = ast.NewGenericVisitor(func(x any) bool {
		switch x := x.(type) {
		case *ast.With:
			if x.Target.Value.Compare(ast.InputRootRef) == 0 || isInputRef(x.Target.Value) {
				a.wholeInput = true
			}
			if r, ok := x.Target.Value.(ast.Ref); ok {
				noteCall(r.String())
			}
		case *ast.Expr:
			if x.IsCall() {
				noteCall(x.Operator().String())
			}
		case ast.Call:
			if len(x) > 0 {
				if r, ok := x[0].Value.(ast.Ref); ok {
					noteCall(r.String())
				}
			}
		case ast.Var:
			if x.Equal(inputVar) {
				// input not at the head of a constant reference.
				a.wholeInput = true
			}
		case ast.Ref:
			if len(x) == 0 {
				return false
			}
			noteCall(x.String())
			head, ok := x[0].Value.(ast.Var)
			if !ok || !head.Equal(inputVar) {
				return false
			}
			var p []string
			for _, t := range x[1:] {
				s, ok := t.Value.(ast.String)
				if !ok {
					break
				}
				p = append(p, string(s))
			}
			if len(p) == 0 {
				a.wholeInput = true
			} else {
				raw = append(raw, p)
			}
			// Visit the dynamic parts (input.a[input.b]) but not the head,
			// which would otherwise count as a bare use of input.
			for _, t := range x[1:] {
				vis.Walk(t)
			}
			return true
		}
		return false
	})
	// Rules only: the compiler has already rewritten every use of an
	// import alias (import input.attributes.request.http as http_request)
	// into a full reference, so the import itself reads nothing.
	for _, m := range mods {
		for _, r := range m.Rules {
			vis.Walk(r)
		}
	}
	if !a.wholeInput {
		a.paths = minimalPaths(raw)
	}
	return a
}

func isInputRef(v ast.Value) bool {
	r, ok := v.(ast.Ref)
	return ok && len(r) > 0 && r[0].Value.Compare(ast.InputRootDocument.Value) == 0
}

// minimalPaths drops duplicates and any path that extends another one: the
// shorter path's value already covers it.
func minimalPaths(paths [][]string) [][]string {
	var out [][]string
outer:
	for i, p := range paths {
		for j, q := range paths {
			if i == j {
				continue
			}
			if isPrefix(q, p) && (len(q) < len(p) || j < i) {
				continue outer
			}
		}
		out = append(out, p)
	}
	return out
}

func isPrefix(q, p []string) bool {
	if len(q) > len(p) {
		return false
	}
	for i := range q {
		if q[i] != p[i] {
			return false
		}
	}
	return true
}
