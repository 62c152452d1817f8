// Package enforcertest holds test support for the enforcer's benchmarks:
// the baseline input builder that does what opa-envoy-plugin does, so
// Writ's own input construction is measured against it. Only tests import
// it.
package enforcertest

import (
	"net/url"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/util"
	"google.golang.org/protobuf/encoding/protojson"
)

// OPAEnvoyInput builds the input as opa-envoy-plugin does: protojson of
// the CheckRequest plus parsed_path, parsed_query and version.
func OPAEnvoyInput(req *authv3.CheckRequest) (map[string]any, error) {
	bs, err := protojson.Marshal(req)
	if err != nil {
		return nil, err
	}
	var in map[string]any
	if err := util.UnmarshalJSON(bs, &in); err != nil {
		return nil, err
	}
	in["version"] = map[string]any{"ext_authz": "v3", "encoding": "protojson"}
	u, err := url.Parse(req.GetAttributes().GetRequest().GetHttp().GetPath())
	if err != nil {
		return nil, err
	}
	var pp []any
	for _, s := range strings.Split(strings.TrimLeft(u.Path, "/"), "/") {
		pp = append(pp, s)
	}
	pq := map[string]any{}
	for k, vs := range u.Query() {
		l := make([]any, len(vs))
		for i, v := range vs {
			l[i] = v
		}
		pq[k] = l
	}
	in["parsed_path"], in["parsed_query"], in["parsed_body"], in["truncated_body"] = pp, pq, nil, false
	return in, nil
}
