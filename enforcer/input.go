package enforcer

import (
	"encoding/json"
	"fmt"
	"net/url"
	"strconv"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/util"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
)

// DefaultMaxBodyBytes bounds the request body the enforcer parses into
// input.parsed_body. A larger body is left unparsed and reported as
// truncated, so a policy cannot be made to spend memory on it.
const DefaultMaxBodyBytes = 64 << 10

// ServiceContextKey is the ext_authz context extension that names the
// destination service, when the proxy sets it.
const ServiceContextKey = "writ.service"

// requestFacts are the parts of a request the decision record keeps.
type requestFacts struct {
	method, rawPath, path, protocol string
	source, destination, traceID    string
	grpc                            bool
}

// headerValue looks a header up in the map Envoy sends by default and in
// the header_map it sends with encode_raw_headers.
func headerValue(h *authv3.AttributeContext_HttpRequest, name string) string {
	if v, ok := h.GetHeaders()[name]; ok {
		return v
	}
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if strings.EqualFold(hv.GetKey(), name) {
			if hv.GetValue() != "" {
				return hv.GetValue()
			}
			return string(hv.GetRawValue())
		}
	}
	return ""
}

// buildInput makes the policy input the way opa-envoy-plugin does — the
// protojson form of the CheckRequest plus parsed_path, parsed_query,
// parsed_body, truncated_body and version — except that every place the
// request path appears carries the normalized path, and input.writ holds
// the parsed SPIFFE identities. An error wrapping ErrBadPath means 400.
func buildInput(req *authv3.CheckRequest, maxBody int) (ast.Value, requestFacts, error) {
	attrs := req.GetAttributes()
	h := attrs.GetRequest().GetHttp()
	f := requestFacts{
		method:      h.GetMethod(),
		rawPath:     h.GetPath(),
		protocol:    h.GetProtocol(),
		source:      attrs.GetSource().GetPrincipal(),
		destination: attrs.GetDestination().GetPrincipal(),
		traceID:     traceID(headerValue(h, "traceparent")),
		grpc:        strings.HasPrefix(headerValue(h, "content-type"), "application/grpc"),
	}
	path, query, err := NormalizePath(h.GetPath())
	if err != nil {
		return nil, f, err
	}
	f.path = path
	target := path
	if query != "" {
		target += "?" + query
	}

	bs, err := protojson.Marshal(req)
	if err != nil {
		return nil, f, fmt.Errorf("marshal check request: %w", err)
	}
	var in map[string]any
	if err := util.UnmarshalJSON(bs, &in); err != nil {
		return nil, f, fmt.Errorf("unmarshal check request: %w", err)
	}
	if hm := httpMap(in); hm != nil {
		hm["path"] = target
		if hs, ok := hm["headers"].(map[string]any); ok {
			if _, ok := hs[":path"]; ok {
				hs[":path"] = target
			}
		}
	}
	in["version"] = map[string]any{"ext_authz": "v3", "encoding": "protojson"}

	parsedPath, parsedQuery, err := parsePathAndQuery(target)
	if err != nil {
		return nil, f, err
	}
	in["parsed_path"] = parsedPath
	in["parsed_query"] = parsedQuery
	body, truncated, err := parseBody(h, maxBody)
	if err != nil {
		return nil, f, err
	}
	in["parsed_body"] = body
	in["truncated_body"] = truncated
	in["writ"] = writInput(req)

	v, err := ast.InterfaceToValue(in)
	if err != nil {
		return nil, f, fmt.Errorf("build input: %w", err)
	}
	return v, f, nil
}

func httpMap(in map[string]any) map[string]any {
	a, _ := in["attributes"].(map[string]any)
	r, _ := a["request"].(map[string]any)
	h, _ := r["http"].(map[string]any)
	return h
}

// parsePathAndQuery splits the (already normalized) target as
// opa-envoy-plugin does: path segments percent-decoded, without the leading
// slash; the query as a map of value lists.
func parsePathAndQuery(target string) ([]any, map[string]any, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, nil, &pathError{"unparsable target"}
	}
	segs := strings.Split(strings.TrimLeft(u.Path, "/"), "/")
	parsedPath := make([]any, len(segs))
	for i, s := range segs {
		parsedPath[i] = s
	}
	parsedQuery := map[string]any{}
	for k, vs := range u.Query() {
		l := make([]any, len(vs))
		for i, v := range vs {
			l[i] = v
		}
		parsedQuery[k] = l
	}
	return parsedPath, parsedQuery, nil
}

// parseBody parses a JSON body as opa-envoy-plugin does: only for a JSON
// content type, reporting truncation when content-length says more was
// sent than Envoy forwarded. Bodies over maxBody are not parsed and are
// reported as truncated.
func parseBody(h *authv3.AttributeContext_HttpRequest, maxBody int) (any, bool, error) {
	ct := headerValue(h, "content-type")
	if !strings.Contains(ct, "application/json") {
		return nil, false, nil
	}
	body := h.GetBody()
	if body == "" {
		return nil, false, nil
	}
	if cl := headerValue(h, "content-length"); cl != "" {
		n, err := strconv.ParseInt(cl, 10, 64)
		if err != nil {
			return nil, false, fmt.Errorf("content-length %q: %w", cl, err)
		}
		if n != -1 && n > int64(len(body)) {
			return nil, true, nil
		}
	}
	if len(body) > maxBody {
		return nil, true, nil
	}
	dec := json.NewDecoder(strings.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, false, fmt.Errorf("parse JSON body: %w", err)
	}
	if dec.More() {
		return nil, false, fmt.Errorf("parse JSON body: trailing data")
	}
	return v, false, nil
}

// writInput is input.writ: the SPIFFE identities of both peers split into
// their parts, and the destination service.
func writInput(req *authv3.CheckRequest) map[string]any {
	attrs := req.GetAttributes()
	w := map[string]any{
		"source":      spiffeParts(attrs.GetSource().GetPrincipal()),
		"destination": spiffeParts(attrs.GetDestination().GetPrincipal()),
	}
	if s := destinationService(req); s != "" {
		w["destination_service"] = s
	}
	return w
}

// destinationService is the context extension the proxy sets, else the
// service Envoy reports for the destination peer, else the request's host
// without its port.
func destinationService(req *authv3.CheckRequest) string {
	attrs := req.GetAttributes()
	if s := attrs.GetContextExtensions()[ServiceContextKey]; s != "" {
		return s
	}
	if s := attrs.GetDestination().GetService(); s != "" {
		return s
	}
	host := attrs.GetRequest().GetHttp().GetHost()
	if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.HasSuffix(host, "]") {
		host = host[:i]
	}
	return host
}

// spiffeParts splits a workload SPIFFE ID of the form
// spiffe://TD/ns/NS/sa/SA. Any other valid SPIFFE ID yields only its ID and
// trust domain; anything else yields an empty object, so a policy that
// tests input.writ.source.namespace finds it undefined, never forged.
func spiffeParts(principal string) map[string]any {
	out := map[string]any{}
	if principal == "" {
		return out
	}
	id, err := spiffeid.FromString(principal)
	if err != nil {
		return out
	}
	out["id"] = id.String()
	out["trust_domain"] = id.TrustDomain().Name()
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) == 4 && segs[0] == "ns" && segs[2] == "sa" {
		out["namespace"] = segs[1]
		out["service_account"] = segs[3]
	}
	return out
}

// traceID extracts the trace id of a W3C traceparent header, or "".
func traceID(tp string) string {
	parts := strings.Split(strings.TrimSpace(tp), "-")
	if len(parts) < 4 || len(parts[0]) != 2 || parts[0] == "ff" || len(parts[1]) != 32 {
		return ""
	}
	id := parts[1]
	if strings.Trim(id, "0") == "" {
		return ""
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return ""
		}
	}
	return id
}
