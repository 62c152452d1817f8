package enforcer

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/util"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// DefaultMaxBodyBytes bounds the request body the enforcer parses into
// input.parsed_body. A larger body is left unparsed and reported as
// truncated, so a policy cannot be made to spend memory on it.
const DefaultMaxBodyBytes = 64 << 10

// ServiceContextKey is the ext_authz context extension that names the
// destination service, when the proxy sets it.
const ServiceContextKey = "writ.service"

// ModeContextKey is the ext_authz context extension carrying the mode of
// the AuthorizationPolicy bound to the destination (writd sets it on the
// inbound route's ExtAuthzPerRoute). ModeDryRun there means: evaluate and
// record, never deny.
const (
	ModeContextKey = "writ.authz_mode"
	ModeDryRun     = "dry-run"
	// DecisionContextKey names the Rego query the bound policies decide
	// by (data.PACKAGE.DECISION; several joined with ",").
	DecisionContextKey = "writ.authz_decision"
	// DryRunContextKey names the queries of the dry-run policies bound
	// beside enforced ones (joined with ","): evaluated on every request
	// and recorded in Decision.DryRun, never enforced.
	DryRunContextKey = "writ.authz_dry_run"
)

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
//
// n limits the input to what the policy can read (nil: everything); the
// protojson fallback always builds everything.
func buildInput(req *authv3.CheckRequest, maxBody int, n *need) (ast.Value, requestFacts, error) {
	return buildInputWith(req, bodyParser{max: maxBody}, n)
}

// buildInputWith is buildInput with a body parser that may also decode
// gRPC messages.
func buildInputWith(req *authv3.CheckRequest, bp bodyParser, n *need) (ast.Value, requestFacts, error) {
	f, target, err := factsAndTarget(req)
	if err != nil {
		return nil, f, err
	}

	var base ast.Object
	if base, err = protoToValue(req, target, n); errors.Is(err, errSlowPath) {
		base, err = protojsonValue(req, target)
		n = needAll
	}
	if err != nil {
		return nil, f, err
	}
	if err := addExtras(base, req, target, bp, n); err != nil {
		return nil, f, err
	}
	return base, f, nil
}

// factsAndTarget reads the facts a decision records and the normalized
// request target (path and query) that policy sees; an error wrapping
// ErrBadPath means 400.
func factsAndTarget(req *authv3.CheckRequest) (requestFacts, string, error) {
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
	// A request without HTTP attributes is a network-level (L4) check, as
	// Envoy's network ext_authz filter sends once per connection: there is
	// no path to normalize, and input has no parsed_path or parsed_query.
	// It must name its source peer; an empty request is still refused.
	var target string
	if h != nil || attrs.GetSource() == nil {
		path, query, err := NormalizePath(h.GetPath())
		if err != nil {
			return f, "", err
		}
		f.path = path
		target = path
		if query != "" {
			target += "?" + query
		}
	}
	return f, target, nil
}

// protojsonValue is the reference way to the input: protojson, as
// opa-envoy-plugin does it, then JSON to AST. It serves requests the direct
// conversion does not handle, and tests compare the two.
func protojsonValue(req *authv3.CheckRequest, target string) (ast.Object, error) {
	bs, err := protojson.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("marshal check request: %w", err)
	}
	var in map[string]any
	if err := util.UnmarshalJSON(bs, &in); err != nil {
		return nil, fmt.Errorf("unmarshal check request: %w", err)
	}
	if hm := httpMap(in); hm != nil {
		hm["path"] = target
		if hs, ok := hm["headers"].(map[string]any); ok {
			if _, ok := hs[":path"]; ok {
				hs[":path"] = target
			}
		}
	}
	v, err := ast.InterfaceToValue(in)
	if err != nil {
		return nil, fmt.Errorf("build input: %w", err)
	}
	return v.(ast.Object), nil
}

var versionValue = ast.NewObject(
	ast.Item(ast.InternedTerm("ext_authz"), ast.InternedTerm("v3")),
	ast.Item(ast.InternedTerm("encoding"), ast.InternedTerm("protojson")),
)

// addExtras adds what opa-envoy-plugin adds to the protojson form, and
// input.writ.
// The body is parsed (and a malformed JSON body refused) whether or not the
// policy reads it, so that what is denied does not depend on the policy's
// shape.
func addExtras(in ast.Object, req *authv3.CheckRequest, target string, bp bodyParser, n *need) error {
	body, truncated, err := bp.parse(req.GetAttributes().GetRequest().GetHttp(), target)
	if err != nil {
		return err
	}
	if n.child("version") != nil {
		in.Insert(ast.InternedTerm("version"), ast.NewTerm(versionValue.Copy()))
	}
	if req.GetAttributes().GetRequest().GetHttp() != nil && (n.child("parsed_path") != nil || n.child("parsed_query") != nil) {
		parsedPath, parsedQuery, err := parsePathAndQuery(target)
		if err != nil {
			return err
		}
		in.Insert(ast.InternedTerm("parsed_path"), ast.NewTerm(parsedPath))
		in.Insert(ast.InternedTerm("parsed_query"), ast.NewTerm(parsedQuery))
	}
	if n.child("parsed_body") != nil {
		in.Insert(ast.InternedTerm("parsed_body"), ast.NewTerm(body))
	}
	if n.child("truncated_body") != nil {
		in.Insert(ast.InternedTerm("truncated_body"), ast.InternedTerm(truncated))
	}
	if n.child("writ") != nil {
		in.Insert(ast.InternedTerm("writ"), ast.NewTerm(writInput(req)))
	}
	return nil
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
func parsePathAndQuery(target string) (*ast.Array, ast.Object, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, nil, &pathError{"unparsable target"}
	}
	segs := strings.Split(strings.TrimLeft(u.Path, "/"), "/")
	terms := make([]*ast.Term, len(segs))
	for i, s := range segs {
		terms[i] = ast.StringTerm(s)
	}
	q := ast.NewObject()
	if u.RawQuery != "" {
		for k, vs := range u.Query() {
			l := make([]*ast.Term, len(vs))
			for i, v := range vs {
				l[i] = ast.StringTerm(v)
			}
			q.Insert(ast.StringTerm(k), ast.ArrayTerm(l...))
		}
	}
	return ast.NewArray(terms...), q, nil
}

// writInput is input.writ: the SPIFFE identities of both peers split into
// their parts, and the destination service.
func writInput(req *authv3.CheckRequest) ast.Object {
	attrs := req.GetAttributes()
	w := ast.NewObject(
		ast.Item(ast.InternedTerm("source"), ast.NewTerm(spiffePartsCached(attrs.GetSource().GetPrincipal()))),
		ast.Item(ast.InternedTerm("destination"), ast.NewTerm(spiffePartsCached(attrs.GetDestination().GetPrincipal()))),
	)
	if s := destinationService(req); s != "" {
		w.Insert(ast.InternedTerm("destination_service"), ast.StringTerm(s))
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

// spiffeCache keeps the input object of principals seen before: a mesh
// has few, and every request of a connection names the same two. Cached
// objects are shared by concurrent inputs and never modified. The cache
// stops growing at spiffeCacheMax entries.
var (
	spiffeCache  sync.Map // principal -> ast.Object
	spiffeCached atomic.Int64
)

const spiffeCacheMax = 4096

func spiffePartsCached(principal string) ast.Object {
	if v, ok := spiffeCache.Load(principal); ok {
		return v.(ast.Object)
	}
	o := spiffeParts(principal)
	if spiffeCached.Add(1) <= spiffeCacheMax {
		spiffeCache.Store(principal, o)
	}
	return o
}

// spiffeParts splits a workload SPIFFE ID of the form
// spiffe://TD/ns/NS/sa/SA. Any other valid SPIFFE ID yields only its ID and
// trust domain; anything else yields an empty object, so a policy that
// tests input.writ.source.namespace finds it undefined, never forged.
func spiffeParts(principal string) ast.Object {
	out := ast.NewObject()
	if principal == "" {
		return out
	}
	id, err := spiffeid.FromString(principal)
	if err != nil {
		return out
	}
	out.Insert(ast.InternedTerm("id"), ast.StringTerm(id.String()))
	out.Insert(ast.InternedTerm("trust_domain"), ast.StringTerm(id.TrustDomain().Name()))
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) == 4 && segs[0] == "ns" && segs[2] == "sa" {
		out.Insert(ast.InternedTerm("namespace"), ast.StringTerm(segs[1]))
		out.Insert(ast.InternedTerm("service_account"), ast.StringTerm(segs[3]))
	}
	return out
}

// traceID extracts the trace id of a W3C traceparent header, or "".
func traceID(tp string) string {
	// Four or more dash-separated fields: version, trace id, ...
	version, rest, _ := strings.Cut(strings.TrimSpace(tp), "-")
	id, rest, ok := strings.Cut(rest, "-")
	if !ok || strings.IndexByte(rest, '-') < 0 || len(version) != 2 || version == "ff" || len(id) != 32 {
		return ""
	}
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

// Input builds the complete policy input for req, as Check would before
// trimming it to what a policy reads. It serves `writ policy eval` and
// tools that show users their input documents. maxBody <= 0 means
// DefaultMaxBodyBytes. An error wrapping ErrBadPath means Check would
// answer 400 without asking policy.
func Input(req *authv3.CheckRequest, maxBody int) (ast.Value, error) {
	return InputWith(req, maxBody, nil)
}

// InputWith is Input with the descriptors that decode gRPC request
// messages into input.parsed_body (see Options.ProtoDescriptors).
func InputWith(req *authv3.CheckRequest, maxBody int, protos *protoregistry.Files) (ast.Value, error) {
	if maxBody <= 0 {
		maxBody = DefaultMaxBodyBytes
	}
	v, _, err := buildInputWith(req, bodyParser{max: maxBody, protos: protos}, needAll)
	return v, err
}
