package decision

import "github.com/open-policy-agent/opa/v1/ast"

// adminSmokeInputs exercise an admin policy with nothing and with a
// typical request before it is swapped in.
func adminSmokeInputs() []ast.Value {
	sample := ast.MustParseTerm(`{
		"caller": {"spiffe_id": "spiffe://example.org/ns/default/sa/app", "trust_domain": "example.org",
			"path": "/ns/default/sa/app", "namespace": "default", "service_account": "app", "auth": "x509"},
		"api": "authzen", "action": "evaluate", "method": "POST", "path": "/access/v1/evaluation"
	}`).Value
	return []ast.Value{ast.NewObject(), sample}
}
