package decision

import (
	"github.com/open-policy-agent/opa/v1/ast"

	"github.com/writmesh/writ/policy"
)

// EngineOptions are the policy options of the engine that answers
// AuthZEN evaluations for dir: the decision path (DefaultAuthZENPath when
// empty) and smoke inputs of the AuthZEN input's shape, so that a policy
// that errors on ordinary evaluations is never swapped in.
func EngineOptions(dir, decisionPath string) policy.Options {
	if decisionPath == "" {
		decisionPath = DefaultAuthZENPath
	}
	sample := ast.MustParseTerm(`{
		"subject": {"type": "user", "id": "smoke@example.org", "properties": {}},
		"resource": {"type": "document", "id": "smoke"},
		"action": {"name": "can_read"},
		"context": {},
		"writ": {"api": "authzen", "caller": {"spiffe_id": "spiffe://example.org/ns/default/sa/app",
			"trust_domain": "example.org", "path": "/ns/default/sa/app", "namespace": "default",
			"service_account": "app", "auth": "x509"}}
	}`).Value
	return policy.Options{Dir: dir, DecisionPath: decisionPath, SmokeInputs: []ast.Value{ast.NewObject(), sample}}
}

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
