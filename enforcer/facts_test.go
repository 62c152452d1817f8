package enforcer

import (
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
)

// TestRequestViewRepeats: a path asked again gets the first answer, and
// paths beyond those remembered, or alike but for one segment, get their
// own.
func TestRequestViewRepeats(t *testing.T) {
	req := checkRequest(peer("10.0.0.1", 1, "spiffe://example.org/ns/a/sa/client"), peer("10.0.0.2", 2, "spiffe://example.org/ns/b/sa/server"),
		&authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/x", Host: "orders:80", Headers: map[string]string{"x-a": "1"}},
		map[string]string{ServiceContextKey: "orders"})
	v := &requestView{req: req, target: "/x"}
	paths := []struct {
		p    []string
		want string // "" for absent
	}{
		{[]string{"writ", "source", "service_account"}, "client"},
		{[]string{"writ", "destination", "service_account"}, "server"},
		{[]string{"writ", "source", "namespace"}, "a"},
		{[]string{"writ", "destination_service"}, "orders"},
		{[]string{"attributes", "request", "http", "method"}, "GET"},
		{[]string{"attributes", "request", "http", "headers", "x-a"}, "1"},
		{[]string{"attributes", "request", "http", "headers", "x-b"}, ""},
	}
	for round := range 3 {
		for _, tc := range paths {
			term, ok := v.Lookup(append([]string(nil), tc.p...))
			if tc.want == "" {
				if ok {
					t.Fatalf("round %d: %v: %v, want absent", round, tc.p, term)
				}
				continue
			}
			if !ok || !term.Equal(ast.StringTerm(tc.want)) {
				t.Fatalf("round %d: %v: %v %v, want %q", round, tc.p, term, ok, tc.want)
			}
		}
	}
}
