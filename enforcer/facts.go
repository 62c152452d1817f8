package enforcer

import (
	"slices"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
)

// requestView answers policy.Facts from a CheckRequest for the input
// paths policies read most (peers' principals, method, normalized path,
// host and other request strings, headers, input.writ), with exactly the
// values the input document would hold there: the normalized target for
// the path and ":path", nothing for an empty string (protojson leaves
// unpopulated fields out). Any other path is "cannot tell", and the
// enforcer builds the input. Not safe for concurrent use: one per check.
type requestView struct {
	req    *authv3.CheckRequest
	target string
	// seen are the first answers given: a residual's unknowns and the
	// decision cache's key ask for the same paths, and each string term
	// answered is an allocation. The paths are the policy set's own,
	// which never change.
	seen  [2]seenPath
	nseen int
}

type seenPath struct {
	p  []string
	t  *ast.Term
	ok bool
}

func (v *requestView) Lookup(p []string) (*ast.Term, bool) {
	for _, s := range v.seen[:v.nseen] {
		if slices.Equal(s.p, p) {
			return s.t, s.ok
		}
	}
	t, ok := v.lookup(p)
	if v.nseen < len(v.seen) {
		v.seen[v.nseen] = seenPath{p: p, t: t, ok: ok}
		v.nseen++
	}
	return t, ok
}

func (v *requestView) lookup(p []string) (*ast.Term, bool) {
	attrs := v.req.GetAttributes()
	str := func(s string) (*ast.Term, bool) {
		if s == "" {
			return nil, false
		}
		return ast.StringTerm(s), true
	}
	switch {
	case len(p) == 3 && p[0] == "attributes" && p[2] == "principal":
		switch p[1] {
		case "source":
			return str(attrs.GetSource().GetPrincipal())
		case "destination":
			return str(attrs.GetDestination().GetPrincipal())
		}
	case len(p) >= 4 && p[0] == "attributes" && p[1] == "request" && p[2] == "http":
		h := attrs.GetRequest().GetHttp()
		if h == nil {
			return nil, false
		}
		if len(p) == 4 {
			switch p[3] {
			case "method":
				return str(h.GetMethod())
			case "path":
				return str(v.target)
			case "host":
				return str(h.GetHost())
			case "scheme":
				return str(h.GetScheme())
			case "protocol":
				return str(h.GetProtocol())
			case "id":
				return str(h.GetId())
			}
			return nil, false
		}
		if len(p) == 5 && p[3] == "headers" {
			val, ok := h.GetHeaders()[p[4]]
			if !ok {
				return nil, false
			}
			if p[4] == ":path" {
				val = v.target
			}
			return ast.StringTerm(val), true
		}
	case len(p) == 3 && p[0] == "writ" && (p[1] == "source" || p[1] == "destination"):
		principal := attrs.GetSource().GetPrincipal()
		if p[1] == "destination" {
			principal = attrs.GetDestination().GetPrincipal()
		}
		key, ok := spiffeKeys[p[2]]
		if !ok {
			key = ast.StringTerm(p[2])
		}
		t := spiffePartsCached(principal).Get(key)
		return t, t != nil
	case len(p) == 2 && p[0] == "writ" && p[1] == "destination_service":
		return str(destinationService(v.req))
	}
	return nil, false
}

// bodyless reports whether req carries no body, so that deciding it
// without an input document skips no body check (a malformed body
// denies whether or not the policy reads it).
func bodyless(req *authv3.CheckRequest) bool {
	h := req.GetAttributes().GetRequest().GetHttp()
	return h.GetBody() == "" && len(h.GetRawBody()) == 0
}

// spiffeKeys are the keys of spiffeParts' objects, made once rather than
// per look-up.
var spiffeKeys = map[string]*ast.Term{
	"id": ast.StringTerm("id"), "trust_domain": ast.StringTerm("trust_domain"),
	"namespace": ast.StringTerm("namespace"), "service_account": ast.StringTerm("service_account"),
}
