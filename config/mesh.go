package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/writmesh/writ/internal/meshlimits"
	"github.com/writmesh/writ/internal/saferegex"
	"gopkg.in/yaml.v3"
)

// MeshAPIVersion is the apiVersion every mesh resource carries.
const MeshAPIVersion = "writ.dev/v1alpha1"

// Mesh resource kinds.
const (
	KindService             = "Service"
	KindRoute               = "Route"
	KindTrafficPolicy       = "TrafficPolicy"
	KindAuthorizationPolicy = "AuthorizationPolicy"
)

// Kinds lists the mesh kinds in the order they are applied and shown.
var Kinds = []string{KindService, KindRoute, KindTrafficPolicy, KindAuthorizationPolicy}

// DefaultNamespace is the namespace of a resource whose metadata names none.
const DefaultNamespace = "default"

// Metadata names a mesh resource.
type Metadata struct {
	Name      string            `yaml:"name" json:"name"`
	Namespace string            `yaml:"namespace,omitempty" json:"namespace,omitempty"`
	Labels    map[string]string `yaml:"labels,omitempty" json:"labels,omitempty"`
}

// Resource is one mesh resource. Spec is one of *ServiceSpec, *RouteSpec,
// *TrafficPolicySpec or *AuthorizationPolicySpec, matching Kind. A Resource
// is a value: nothing in Writ mutates one after decoding.
type Resource struct {
	APIVersion string   `yaml:"apiVersion" json:"apiVersion"`
	Kind       string   `yaml:"kind" json:"kind"`
	Metadata   Metadata `yaml:"metadata" json:"metadata"`
	Spec       any      `yaml:"spec" json:"spec"`

	// File and node locate the resource's source for error messages; empty
	// for resources read back from storage.
	File string     `yaml:"-" json:"-"`
	node *yaml.Node `yaml:"-" json:"-"`
}

// Key is the unique name of a resource: "Kind/namespace/name".
func (r *Resource) Key() string {
	return r.Kind + "/" + r.Metadata.Namespace + "/" + r.Metadata.Name
}

// Ref is the service-style reference "name.namespace".
func (r *Resource) Ref() string { return r.Metadata.Name + "." + r.Metadata.Namespace }

// errAt builds a FieldError located in r's source.
func (r *Resource) errAt(field, format string, a ...any) *FieldError {
	fe := &FieldError{File: r.File, Field: field, Msg: fmt.Sprintf(format, a...)}
	if fe.File == "" {
		fe.File = r.Key()
	}
	if r.node != nil {
		fe.Line = lineOf(r.node, field)
	}
	return fe
}

// UnmarshalJSON decodes a resource strictly, choosing the spec type by kind.
func (r *Resource) UnmarshalJSON(b []byte) error {
	var raw struct {
		APIVersion string          `json:"apiVersion"`
		Kind       string          `json:"kind"`
		Metadata   Metadata        `json:"metadata"`
		Spec       json.RawMessage `json:"spec"`
	}
	if err := strictJSON(b, &raw); err != nil {
		return err
	}
	spec, err := newSpec(raw.Kind)
	if err != nil {
		return err
	}
	if len(raw.Spec) > 0 && string(raw.Spec) != "null" {
		if err := strictJSON(raw.Spec, spec); err != nil {
			return fmt.Errorf("%s spec: %w", raw.Kind, err)
		}
	}
	*r = Resource{APIVersion: raw.APIVersion, Kind: raw.Kind, Metadata: raw.Metadata, Spec: spec}
	return nil
}

func strictJSON(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	return d.Decode(v)
}

func newSpec(kind string) (any, error) {
	switch kind {
	case KindService:
		return &ServiceSpec{}, nil
	case KindRoute:
		return &RouteSpec{}, nil
	case KindTrafficPolicy:
		return &TrafficPolicySpec{}, nil
	case KindAuthorizationPolicy:
		return &AuthorizationPolicySpec{}, nil
	}
	return nil, fmt.Errorf("unknown kind %q (want one of %s)", kind, strings.Join(Kinds, ", "))
}

// KindOf resolves a kind as a user types it ("route", "routes", "Route").
func KindOf(s string) (string, bool) {
	l := strings.TrimSuffix(strings.ToLower(s), "s")
	l = strings.TrimSuffix(l, "ie") // "policies" -> "polic"
	for _, k := range Kinds {
		kl := strings.ToLower(k)
		if l == kl || l+"y" == kl || strings.TrimSuffix(kl, "y") == l {
			return k, true
		}
	}
	return "", false
}

// Protocols a service port may speak.
const (
	ProtocolHTTP  = "http"
	ProtocolHTTP2 = "http2"
	ProtocolGRPC  = "grpc"
	ProtocolTCP   = "tcp"
)

// ServiceSpec declares a service: its ports, the subsets routes may target
// (by workload labels such as version), and static endpoints for workloads
// outside the mesh.
type ServiceSpec struct {
	Ports     []ServicePort    `yaml:"ports" json:"ports"`
	Subsets   []Subset         `yaml:"subsets,omitempty" json:"subsets,omitempty"`
	Endpoints []StaticEndpoint `yaml:"endpoints,omitempty" json:"endpoints,omitempty"`
}

// ServicePort is one port of a service.
type ServicePort struct {
	Name     string `yaml:"name,omitempty" json:"name,omitempty"`
	Port     int    `yaml:"port" json:"port"`
	Protocol string `yaml:"protocol" json:"protocol"`
}

// Subset is a named group of a service's workloads selected by labels.
type Subset struct {
	Name   string            `yaml:"name" json:"name"`
	Labels map[string]string `yaml:"labels" json:"labels"`
}

// StaticEndpoint is a workload declared by hand rather than registered.
type StaticEndpoint struct {
	Address string            `yaml:"address" json:"address"`
	Port    int               `yaml:"port" json:"port"`
	Labels  map[string]string `yaml:"labels,omitempty" json:"labels,omitempty"`
}

// RouteSpec routes the traffic addressed to Service by ordered rules.
type RouteSpec struct {
	Service string      `yaml:"service" json:"service"`
	Rules   []RouteRule `yaml:"rules" json:"rules"`
}

// RouteRule is one rule: the first rule whose matches all hold wins.
type RouteRule struct {
	Name         string        `yaml:"name,omitempty" json:"name,omitempty"`
	Match        *Match        `yaml:"match,omitempty" json:"match,omitempty"`
	Destinations []Destination `yaml:"destinations" json:"destinations"`
	Timeout      Duration      `yaml:"timeout,omitempty" json:"timeout,omitempty"`
	Retries      *Retries      `yaml:"retries,omitempty" json:"retries,omitempty"`
	Mirror       *Mirror       `yaml:"mirror,omitempty" json:"mirror,omitempty"`
	Fault        *Fault        `yaml:"fault,omitempty" json:"fault,omitempty"`
}

// Match selects requests. Exactly one of the path forms may be set.
type Match struct {
	PathPrefix string        `yaml:"pathPrefix,omitempty" json:"pathPrefix,omitempty"`
	PathExact  string        `yaml:"pathExact,omitempty" json:"pathExact,omitempty"`
	PathRegex  string        `yaml:"pathRegex,omitempty" json:"pathRegex,omitempty"`
	Method     string        `yaml:"method,omitempty" json:"method,omitempty"`
	Headers    []HeaderMatch `yaml:"headers,omitempty" json:"headers,omitempty"`
}

// HeaderMatch matches one request header; exactly one form is set.
type HeaderMatch struct {
	Name    string `yaml:"name" json:"name"`
	Exact   string `yaml:"exact,omitempty" json:"exact,omitempty"`
	Prefix  string `yaml:"prefix,omitempty" json:"prefix,omitempty"`
	Regex   string `yaml:"regex,omitempty" json:"regex,omitempty"`
	Present bool   `yaml:"present,omitempty" json:"present,omitempty"`
}

// Destination is a weighted target: a service (default: the route's) and
// optionally one of its subsets.
type Destination struct {
	Service string `yaml:"service,omitempty" json:"service,omitempty"`
	Subset  string `yaml:"subset,omitempty" json:"subset,omitempty"`
	Weight  int    `yaml:"weight,omitempty" json:"weight,omitempty"`
}

// Retries is a rule's retry policy.
type Retries struct {
	Attempts      int      `yaml:"attempts" json:"attempts"`
	PerTryTimeout Duration `yaml:"perTryTimeout,omitempty" json:"perTryTimeout,omitempty"`
	On            []string `yaml:"on,omitempty" json:"on,omitempty"`
}

// Mirror copies a percentage of requests to a subset, answers discarded.
type Mirror struct {
	Service string  `yaml:"service,omitempty" json:"service,omitempty"`
	Subset  string  `yaml:"subset,omitempty" json:"subset,omitempty"`
	Percent float64 `yaml:"percent" json:"percent"`
}

// Fault injects delays or aborts into a percentage of requests.
type Fault struct {
	Delay *FaultDelay `yaml:"delay,omitempty" json:"delay,omitempty"`
	Abort *FaultAbort `yaml:"abort,omitempty" json:"abort,omitempty"`
}

// FaultDelay delays Percent of requests by Fixed.
type FaultDelay struct {
	Fixed   Duration `yaml:"fixed" json:"fixed"`
	Percent float64  `yaml:"percent" json:"percent"`
}

// FaultAbort answers Percent of requests with an HTTP or gRPC status.
type FaultAbort struct {
	HTTPStatus int     `yaml:"httpStatus,omitempty" json:"httpStatus,omitempty"`
	GRPCStatus int     `yaml:"grpcStatus,omitempty" json:"grpcStatus,omitempty"`
	Percent    float64 `yaml:"percent" json:"percent"`
}

// TrafficPolicySpec sets how clients reach Service's endpoints.
type TrafficPolicySpec struct {
	Service          string            `yaml:"service" json:"service"`
	LoadBalancer     *LoadBalancer     `yaml:"loadBalancer,omitempty" json:"loadBalancer,omitempty"`
	ConnectionPool   *ConnectionPool   `yaml:"connectionPool,omitempty" json:"connectionPool,omitempty"`
	OutlierDetection *OutlierDetection `yaml:"outlierDetection,omitempty" json:"outlierDetection,omitempty"`
	HealthCheck      *HealthCheck      `yaml:"healthCheck,omitempty" json:"healthCheck,omitempty"`
	RetryBudget      *RetryBudget      `yaml:"retryBudget,omitempty" json:"retryBudget,omitempty"`
}

// Load-balancing policies.
const (
	LBRoundRobin   = "round_robin"
	LBLeastRequest = "least_request"
	LBRingHash     = "ring_hash"
)

// LoadBalancer picks the load-balancing policy; ring_hash hashes on a
// header or on the source address.
type LoadBalancer struct {
	Policy     string `yaml:"policy" json:"policy"`
	HashHeader string `yaml:"hashHeader,omitempty" json:"hashHeader,omitempty"`
	HashSource bool   `yaml:"hashSource,omitempty" json:"hashSource,omitempty"`
}

// ConnectionPool holds the circuit-breaker limits.
type ConnectionPool struct {
	MaxConnections     int `yaml:"maxConnections,omitempty" json:"maxConnections,omitempty"`
	MaxPendingRequests int `yaml:"maxPendingRequests,omitempty" json:"maxPendingRequests,omitempty"`
	MaxRequests        int `yaml:"maxRequests,omitempty" json:"maxRequests,omitempty"`
	MaxRetries         int `yaml:"maxRetries,omitempty" json:"maxRetries,omitempty"`
}

// OutlierDetection ejects endpoints that fail repeatedly: after
// Consecutive5xx 5xx answers (or failed connections, resets, timeouts)
// in a row, or ConsecutiveGatewayFailure 502/503/504 answers (or failed
// connections, resets, timeouts) in a row. At least one of the two is
// set; only those set eject. Ejections last BaseEjectionTime times the
// endpoint's ejection count (which decays by one per Interval back in
// the pool), at most MaxEjectionTime; ejected endpoints return at the
// sweep every Interval.
//
// Two detectors judge each Interval's requests to an endpoint (a
// request fails if it answers 5xx, or fails to connect, is reset or times
// out) and are on when their Enforcing percentage is set above 0 (it is
// the chance that a detection ejects): success rate ejects an endpoint
// whose success rate is below the mean minus SuccessRateStdevFactor/1000
// standard deviations; failure percentage one whose failed share is at
// least FailurePercentageThreshold percent. Each counts only endpoints
// with at least its RequestVolume requests in the interval, and only
// when there are MinimumHosts of them. Unset, the fields take Envoy's
// defaults: minimum hosts 5, volumes 100 and 50, factor 1900,
// threshold 85.
type OutlierDetection struct {
	Consecutive5xx            int      `yaml:"consecutive5xx,omitempty" json:"consecutive5xx,omitempty"`
	ConsecutiveGatewayFailure int      `yaml:"consecutiveGatewayFailure,omitempty" json:"consecutiveGatewayFailure,omitempty"`
	Interval                  Duration `yaml:"interval,omitempty" json:"interval,omitempty"`
	BaseEjectionTime          Duration `yaml:"baseEjectionTime,omitempty" json:"baseEjectionTime,omitempty"`
	MaxEjectionTime           Duration `yaml:"maxEjectionTime,omitempty" json:"maxEjectionTime,omitempty"`
	MaxEjectionPercent        int      `yaml:"maxEjectionPercent,omitempty" json:"maxEjectionPercent,omitempty"`

	EnforcingSuccessRate           *int `yaml:"enforcingSuccessRate,omitempty" json:"enforcingSuccessRate,omitempty"`
	SuccessRateMinimumHosts        *int `yaml:"successRateMinimumHosts,omitempty" json:"successRateMinimumHosts,omitempty"`
	SuccessRateRequestVolume       *int `yaml:"successRateRequestVolume,omitempty" json:"successRateRequestVolume,omitempty"`
	SuccessRateStdevFactor         *int `yaml:"successRateStdevFactor,omitempty" json:"successRateStdevFactor,omitempty"`
	EnforcingFailurePercentage     *int `yaml:"enforcingFailurePercentage,omitempty" json:"enforcingFailurePercentage,omitempty"`
	FailurePercentageThreshold     *int `yaml:"failurePercentageThreshold,omitempty" json:"failurePercentageThreshold,omitempty"`
	FailurePercentageMinimumHosts  *int `yaml:"failurePercentageMinimumHosts,omitempty" json:"failurePercentageMinimumHosts,omitempty"`
	FailurePercentageRequestVolume *int `yaml:"failurePercentageRequestVolume,omitempty" json:"failurePercentageRequestVolume,omitempty"`
}

// SuccessRateOn reports whether the success-rate detector ejects.
func (od *OutlierDetection) SuccessRateOn() bool {
	return od.EnforcingSuccessRate != nil && *od.EnforcingSuccessRate > 0
}

// FailurePercentageOn reports whether the failure-percentage detector
// ejects.
func (od *OutlierDetection) FailurePercentageOn() bool {
	return od.EnforcingFailurePercentage != nil && *od.EnforcingFailurePercentage > 0
}

// HealthCheck is an active health check, over HTTP (Path), gRPC
// (GRPCService, may be empty for the whole server) or TCP connect.
type HealthCheck struct {
	Type               string   `yaml:"type" json:"type"` // http, grpc, tcp
	Path               string   `yaml:"path,omitempty" json:"path,omitempty"`
	GRPCService        string   `yaml:"grpcService,omitempty" json:"grpcService,omitempty"`
	Interval           Duration `yaml:"interval" json:"interval"`
	Timeout            Duration `yaml:"timeout" json:"timeout"`
	UnhealthyThreshold int      `yaml:"unhealthyThreshold,omitempty" json:"unhealthyThreshold,omitempty"`
	HealthyThreshold   int      `yaml:"healthyThreshold,omitempty" json:"healthyThreshold,omitempty"`
}

// RetryBudget caps retries as a share of active requests.
type RetryBudget struct {
	Percent             float64 `yaml:"percent" json:"percent"`
	MinRetryConcurrency int     `yaml:"minRetryConcurrency,omitempty" json:"minRetryConcurrency,omitempty"`
}

// Authorization modes.
const (
	ModeEnforce = "enforce"
	ModeDryRun  = "dry-run"
)

// AuthorizationPolicySpec binds a Rego package's decision to a service.
// Allow, when given, is the same rule in a form RBAC can express, for
// proxyless gRPC servers that cannot call the enforcer. RequestBody, when
// given, has the service's sidecar hand the request body to policy.
type AuthorizationPolicySpec struct {
	Service     string       `yaml:"service" json:"service"`
	Package     string       `yaml:"package" json:"package"`
	Decision    string       `yaml:"decision,omitempty" json:"decision,omitempty"`
	Mode        string       `yaml:"mode" json:"mode"`
	Allow       []AllowRule  `yaml:"allow,omitempty" json:"allow,omitempty"`
	RequestBody *RequestBody `yaml:"requestBody,omitempty" json:"requestBody,omitempty"`
}

// RequestBody is Envoy's ext_authz with_request_body: the sidecar
// buffers up to MaxBytes of a request's body before the check, so that
// policy sees it (input.parsed_body, input.attributes.request.http.body
// or raw_body with PackAsBytes, which gRPC bodies need). A larger body is
// refused with 413 unless AllowPartialMessage, which sends the first
// MaxBytes with input.truncated_body true. Where several policies bound
// to one service ask for it, the largest MaxBytes holds, partial
// messages only if every one allows them, and bytes if any asks.
type RequestBody struct {
	MaxBytes            int  `yaml:"maxBytes" json:"maxBytes"`
	AllowPartialMessage bool `yaml:"allowPartialMessage,omitempty" json:"allowPartialMessage,omitempty"`
	PackAsBytes         bool `yaml:"packAsBytes,omitempty" json:"packAsBytes,omitempty"`
}

// AllowRule allows requests from any of Principals (SPIFFE IDs, "*" for
// any authenticated peer) to any of Paths (prefix when ending in "*") with
// any of Methods; an empty list matches everything.
type AllowRule struct {
	Principals []string `yaml:"principals,omitempty" json:"principals,omitempty"`
	Paths      []string `yaml:"paths,omitempty" json:"paths,omitempty"`
	Methods    []string `yaml:"methods,omitempty" json:"methods,omitempty"`
}

// doc is one YAML document of a given spec type, for strict decoding.
type doc[S any] struct {
	APIVersion string   `yaml:"apiVersion"`
	Kind       string   `yaml:"kind"`
	Metadata   Metadata `yaml:"metadata"`
	Spec       *S       `yaml:"spec"`
}

// maxDocuments bounds the documents of one file.
const maxDocuments = 1000

// DecodeMesh parses every YAML document ("---" separated) of a mesh file
// strictly and validates each resource on its own: unknown keys, a missing
// or unknown apiVersion or kind, wrong types and invalid values are errors
// naming the file, line and field. Empty documents are skipped. Cross-
// resource checks are CheckMesh's.
func DecodeMesh(file string, data []byte) ([]*Resource, error) {
	var nodes []*yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		n := new(yaml.Node)
		err := dec.Decode(n)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fromYAMLError(file, nil, err)
		}
		nodes = append(nodes, n)
		if len(nodes) > maxDocuments {
			return nil, Errors{{File: file, Line: n.Line, Msg: fmt.Sprintf("more than %d documents", maxDocuments)}}
		}
	}
	var out []*Resource
	var errs Errors
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(true)
	for _, n := range nodes {
		r, fes := decodeOne(file, n, strict)
		errs = append(errs, fes...)
		if r != nil {
			out = append(out, r)
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	if len(out) == 0 {
		return nil, Errors{{File: file, Msg: "no resources in file"}}
	}
	return out, nil
}

// decodeOne decodes the next document of strict, whose tree is n.
func decodeOne(file string, n *yaml.Node, strict *yaml.Decoder) (*Resource, Errors) {
	body := n
	if body.Kind == yaml.DocumentNode && len(body.Content) > 0 {
		body = body.Content[0]
	}
	kind := ""
	if body.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(body.Content); i += 2 {
			if body.Content[i].Value == "kind" {
				kind = body.Content[i+1].Value
			}
		}
	}
	var (
		target any
		spec   func() any
	)
	switch kind {
	case KindService:
		d := &doc[ServiceSpec]{}
		target, spec = d, func() any { return orNew(d.Spec) }
	case KindRoute:
		d := &doc[RouteSpec]{}
		target, spec = d, func() any { return orNew(d.Spec) }
	case KindTrafficPolicy:
		d := &doc[TrafficPolicySpec]{}
		target, spec = d, func() any { return orNew(d.Spec) }
	case KindAuthorizationPolicy:
		d := &doc[AuthorizationPolicySpec]{}
		target, spec = d, func() any { return orNew(d.Spec) }
	default:
		var skip yaml.Node
		_ = strict.Decode(&skip)
		if body.Kind == yaml.ScalarNode && body.Tag == "!!null" {
			return nil, nil // an empty document
		}
		if kind == "" {
			return nil, Errors{{File: file, Line: body.Line, Field: "kind", Msg: "missing kind (want one of " + strings.Join(Kinds, ", ") + ")"}}
		}
		return nil, Errors{{File: file, Line: lineOf(n, "kind"), Field: "kind", Msg: fmt.Sprintf("unknown kind %q (want one of %s)", kind, strings.Join(Kinds, ", "))}}
	}
	if err := strict.Decode(target); err != nil {
		var es Errors
		if errors.As(fromYAMLError(file, n, err), &es) {
			return nil, es
		}
		return nil, Errors{{File: file, Line: body.Line, Msg: err.Error()}}
	}
	var r *Resource
	switch d := target.(type) {
	case *doc[ServiceSpec]:
		r = &Resource{APIVersion: d.APIVersion, Kind: d.Kind, Metadata: d.Metadata}
	case *doc[RouteSpec]:
		r = &Resource{APIVersion: d.APIVersion, Kind: d.Kind, Metadata: d.Metadata}
	case *doc[TrafficPolicySpec]:
		r = &Resource{APIVersion: d.APIVersion, Kind: d.Kind, Metadata: d.Metadata}
	case *doc[AuthorizationPolicySpec]:
		r = &Resource{APIVersion: d.APIVersion, Kind: d.Kind, Metadata: d.Metadata}
	}
	r.Spec, r.File, r.node = spec(), file, n
	if r.Metadata.Namespace == "" {
		r.Metadata.Namespace = DefaultNamespace
	}
	return r, r.Validate()
}

func orNew[S any](p *S) *S {
	if p == nil {
		return new(S)
	}
	return p
}

var (
	nameRE  = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	labelRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$`)
	// headerNameRE is an RFC 9110 token, what a header name may be.
	headerNameRE = regexp.MustCompile("^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
	// pkgRE is a Rego package path such as writ.authz.
	pkgRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$`)
)

// Validate checks one resource on its own; errors carry field paths and,
// when the resource came from a file, lines.
func (r *Resource) Validate() Errors {
	var errs Errors
	add := func(field, format string, a ...any) { errs = append(errs, r.errAt(field, format, a...)) }
	if r.APIVersion == "" {
		add("apiVersion", "missing apiVersion (want %s)", MeshAPIVersion)
	} else if r.APIVersion != MeshAPIVersion {
		add("apiVersion", "unsupported apiVersion %q (want %s)", r.APIVersion, MeshAPIVersion)
	}
	if r.Metadata.Name == "" {
		add("metadata.name", "missing name")
	} else if !nameRE.MatchString(r.Metadata.Name) {
		add("metadata.name", "%q is not a valid name (lowercase letters, digits and '-', at most 63)", r.Metadata.Name)
	}
	if !nameRE.MatchString(r.Metadata.Namespace) {
		add("metadata.namespace", "%q is not a valid namespace", r.Metadata.Namespace)
	}
	for k, v := range r.Metadata.Labels {
		if !labelRE.MatchString(k) || (v != "" && !labelRE.MatchString(v)) {
			add("metadata.labels."+k, "invalid label %q=%q", k, v)
		}
	}
	switch s := r.Spec.(type) {
	case *ServiceSpec:
		s.validate(add)
	case *RouteSpec:
		s.validate(add)
	case *TrafficPolicySpec:
		s.validate(add)
	case *AuthorizationPolicySpec:
		s.validate(add)
	default:
		add("spec", "missing spec")
	}
	sort.SliceStable(errs, func(i, j int) bool { return errs[i].Line < errs[j].Line })
	return errs
}

type addFunc func(field, format string, a ...any)

func (s *ServiceSpec) validate(add addFunc) {
	if len(s.Ports) == 0 {
		add("spec.ports", "a service needs at least one port")
	}
	seen := map[int]bool{}
	for i, p := range s.Ports {
		f := fmt.Sprintf("spec.ports[%d]", i)
		if p.Port < 1 || p.Port > 65535 {
			add(f+".port", "port %d is out of range 1-65535", p.Port)
		}
		if seen[p.Port] {
			add(f+".port", "port %d is listed twice", p.Port)
		}
		seen[p.Port] = true
		switch p.Protocol {
		case ProtocolHTTP, ProtocolHTTP2, ProtocolGRPC, ProtocolTCP:
		case "":
			add(f+".protocol", "missing protocol (want http, http2, grpc or tcp)")
		default:
			add(f+".protocol", "unknown protocol %q (want http, http2, grpc or tcp)", p.Protocol)
		}
	}
	names := map[string]bool{}
	for i, ss := range s.Subsets {
		f := fmt.Sprintf("spec.subsets[%d]", i)
		if !nameRE.MatchString(ss.Name) {
			add(f+".name", "%q is not a valid subset name", ss.Name)
		}
		if names[ss.Name] {
			add(f+".name", "subset %q is declared twice", ss.Name)
		}
		names[ss.Name] = true
		if len(ss.Labels) == 0 {
			add(f+".labels", "a subset selects workloads by at least one label")
		}
	}
	for i, e := range s.Endpoints {
		f := fmt.Sprintf("spec.endpoints[%d]", i)
		if _, err := netip.ParseAddr(e.Address); err != nil {
			add(f+".address", "%q is not an IP address", e.Address)
		}
		if e.Port < 1 || e.Port > 65535 {
			add(f+".port", "port %d is out of range 1-65535", e.Port)
		}
	}
}

func (s *RouteSpec) validate(add addFunc) {
	if s.Service == "" {
		add("spec.service", "missing service")
	}
	if len(s.Rules) == 0 {
		add("spec.rules", "a route needs at least one rule")
	}
	for i, rule := range s.Rules {
		f := fmt.Sprintf("spec.rules[%d]", i)
		if m := rule.Match; m != nil {
			n := 0
			for _, p := range []string{m.PathPrefix, m.PathExact, m.PathRegex} {
				if p != "" {
					n++
				}
			}
			if n > 1 {
				add(f+".match", "set only one of pathPrefix, pathExact, pathRegex")
			}
			if m.PathPrefix != "" && !strings.HasPrefix(m.PathPrefix, "/") {
				add(f+".match.pathPrefix", "%q must start with /", m.PathPrefix)
			}
			if m.PathExact != "" && !strings.HasPrefix(m.PathExact, "/") {
				add(f+".match.pathExact", "%q must start with /", m.PathExact)
			}
			if m.PathRegex != "" {
				if _, err := saferegex.Compile(m.PathRegex); err != nil {
					add(f+".match.pathRegex", "%v", err)
				}
			}
			if m.Method != "" && !slices.Contains([]string{"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}, m.Method) {
				add(f+".match.method", "unknown method %q", m.Method)
			}
			for j, h := range m.Headers {
				hf := fmt.Sprintf("%s.match.headers[%d]", f, j)
				switch {
				case h.Name == "":
					add(hf+".name", "missing header name")
				case strings.HasPrefix(h.Name, ":") && h.Name != ":authority" && h.Name != ":method":
					// writ-proxy matches only these pseudo-headers.
					add(hf+".name", "%q: only the :method and :authority pseudo-headers can be matched", h.Name)
				case !headerNameRE.MatchString(strings.TrimPrefix(h.Name, ":")):
					add(hf+".name", "%q is not an HTTP header name", h.Name)
				}
				forms := 0
				for _, v := range []string{h.Exact, h.Prefix, h.Regex} {
					if v != "" {
						forms++
					}
				}
				if h.Present {
					forms++
				}
				if forms != 1 {
					add(hf, "set exactly one of exact, prefix, regex, present")
				}
				if h.Regex != "" {
					if _, err := saferegex.Compile(h.Regex); err != nil {
						add(hf+".regex", "%v", err)
					}
				}
			}
		}
		if len(rule.Destinations) == 0 {
			add(f+".destinations", "a rule needs at least one destination")
		}
		sum := 0
		for j, d := range rule.Destinations {
			if d.Weight < 0 || d.Weight > 100 {
				add(fmt.Sprintf("%s.destinations[%d].weight", f, j), "weight %d is out of range 0-100", d.Weight)
			}
			sum += d.Weight
		}
		if len(rule.Destinations) > 1 && sum != 100 {
			add(f+".destinations", "weights sum to %d, want 100", sum)
		}
		if len(rule.Destinations) == 1 && rule.Destinations[0].Weight != 0 && rule.Destinations[0].Weight != 100 {
			add(f+".destinations[0].weight", "a single destination takes all traffic: weight must be 100 or omitted")
		}
		if rule.Timeout < 0 {
			add(f+".timeout", "negative timeout")
		}
		if rt := rule.Retries; rt != nil {
			if rt.Attempts < 0 || rt.Attempts > meshlimits.MaxRetries {
				add(f+".retries.attempts", "attempts %d is out of range 0-%d", rt.Attempts, meshlimits.MaxRetries)
			}
			for k, on := range rt.On {
				if !slices.Contains(retryOns, on) {
					add(fmt.Sprintf("%s.retries.on[%d]", f, k), "unknown retry condition %q (want one of %s)", on, strings.Join(retryOns, ", "))
				}
			}
		}
		if m := rule.Mirror; m != nil && (m.Percent <= 0 || m.Percent > 100) {
			add(f+".mirror.percent", "percent %v is out of range (0, 100]", m.Percent)
		}
		if ft := rule.Fault; ft != nil {
			if ft.Delay == nil && ft.Abort == nil {
				add(f+".fault", "set delay, abort or both")
			}
			if d := ft.Delay; d != nil {
				if d.Fixed <= 0 {
					add(f+".fault.delay.fixed", "a delay must be positive")
				}
				if d.Percent <= 0 || d.Percent > 100 {
					add(f+".fault.delay.percent", "percent %v is out of range (0, 100]", d.Percent)
				}
			}
			if a := ft.Abort; a != nil {
				if (a.HTTPStatus == 0) == (a.GRPCStatus == 0) {
					add(f+".fault.abort", "set exactly one of httpStatus, grpcStatus")
				}
				if a.HTTPStatus != 0 && (a.HTTPStatus < 200 || a.HTTPStatus > 599) {
					add(f+".fault.abort.httpStatus", "status %d is out of range 200-599", a.HTTPStatus)
				}
				if a.GRPCStatus != 0 && (a.GRPCStatus < meshlimits.MinGRPCStatus || a.GRPCStatus > meshlimits.MaxGRPCStatus) {
					add(f+".fault.abort.grpcStatus", "status %d is out of range %d-%d", a.GRPCStatus, meshlimits.MinGRPCStatus, meshlimits.MaxGRPCStatus)
				}
				if a.Percent <= 0 || a.Percent > 100 {
					add(f+".fault.abort.percent", "percent %v is out of range (0, 100]", a.Percent)
				}
			}
		}
	}
}

var retryOns = []string{"5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream", "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}

func (s *TrafficPolicySpec) validate(add addFunc) {
	if s.Service == "" {
		add("spec.service", "missing service")
	}
	if lb := s.LoadBalancer; lb != nil {
		switch lb.Policy {
		case LBRoundRobin, LBLeastRequest:
			if lb.HashHeader != "" || lb.HashSource {
				add("spec.loadBalancer", "hashHeader and hashSource apply to ring_hash only")
			}
		case LBRingHash:
			if (lb.HashHeader == "") == !lb.HashSource {
				add("spec.loadBalancer", "ring_hash hashes on exactly one of hashHeader, hashSource")
			}
			if lb.HashHeader != "" && !headerNameRE.MatchString(lb.HashHeader) {
				add("spec.loadBalancer.hashHeader", "%q is not an HTTP header name", lb.HashHeader)
			}
		default:
			add("spec.loadBalancer.policy", "unknown policy %q (want round_robin, least_request or ring_hash)", lb.Policy)
		}
	}
	if cp := s.ConnectionPool; cp != nil {
		for _, v := range []struct {
			f string
			n int
		}{{"maxConnections", cp.MaxConnections}, {"maxPendingRequests", cp.MaxPendingRequests}, {"maxRequests", cp.MaxRequests}, {"maxRetries", cp.MaxRetries}} {
			if v.n < 0 {
				add("spec.connectionPool."+v.f, "must not be negative")
			}
		}
	}
	if od := s.OutlierDetection; od != nil {
		switch {
		case od.Consecutive5xx < 0:
			add("spec.outlierDetection.consecutive5xx", "must not be negative")
		case od.ConsecutiveGatewayFailure < 0:
			add("spec.outlierDetection.consecutiveGatewayFailure", "must not be negative")
		case od.Consecutive5xx == 0 && od.ConsecutiveGatewayFailure == 0 && !od.SuccessRateOn() && !od.FailurePercentageOn():
			add("spec.outlierDetection.consecutive5xx", "set consecutive5xx, consecutiveGatewayFailure (at least 1), enforcingSuccessRate or enforcingFailurePercentage (above 0)")
		}
		for _, v := range []struct {
			f       string
			n       *int
			min, mx int
		}{
			{"enforcingSuccessRate", od.EnforcingSuccessRate, 0, 100},
			{"enforcingFailurePercentage", od.EnforcingFailurePercentage, 0, 100},
			{"failurePercentageThreshold", od.FailurePercentageThreshold, 0, 100},
			{"successRateMinimumHosts", od.SuccessRateMinimumHosts, 1, math.MaxInt32},
			{"successRateRequestVolume", od.SuccessRateRequestVolume, 1, math.MaxInt32},
			{"successRateStdevFactor", od.SuccessRateStdevFactor, 1, math.MaxInt32},
			{"failurePercentageMinimumHosts", od.FailurePercentageMinimumHosts, 1, math.MaxInt32},
			{"failurePercentageRequestVolume", od.FailurePercentageRequestVolume, 1, math.MaxInt32},
		} {
			switch {
			case v.n == nil:
			case v.mx == 100 && (*v.n < v.min || *v.n > v.mx):
				add("spec.outlierDetection."+v.f, "%d is out of range 0-100", *v.n)
			case *v.n < v.min:
				add("spec.outlierDetection."+v.f, "must be at least 1")
			case *v.n > v.mx:
				add("spec.outlierDetection."+v.f, "must be at most %d", v.mx)
			}
		}
		if od.MaxEjectionTime > 0 && od.MaxEjectionTime < od.BaseEjectionTime {
			add("spec.outlierDetection.maxEjectionTime", "must not be shorter than baseEjectionTime")
		}
		if od.MaxEjectionPercent < 0 || od.MaxEjectionPercent > 100 {
			add("spec.outlierDetection.maxEjectionPercent", "%d is out of range 0-100", od.MaxEjectionPercent)
		}
	}
	if hc := s.HealthCheck; hc != nil {
		switch hc.Type {
		case "http":
			if !strings.HasPrefix(hc.Path, "/") {
				add("spec.healthCheck.path", "an http health check needs a path starting with /")
			}
		case "grpc", "tcp":
		default:
			add("spec.healthCheck.type", "unknown type %q (want http, grpc or tcp)", hc.Type)
		}
		if hc.Interval <= 0 {
			add("spec.healthCheck.interval", "interval must be positive")
		}
		if hc.Timeout <= 0 {
			add("spec.healthCheck.timeout", "timeout must be positive")
		}
	}
	if rb := s.RetryBudget; rb != nil && (rb.Percent <= 0 || rb.Percent > 100) {
		add("spec.retryBudget.percent", "percent %v is out of range (0, 100]", rb.Percent)
	}
}

func (s *AuthorizationPolicySpec) validate(add addFunc) {
	if s.Service == "" {
		add("spec.service", "missing service")
	}
	if !pkgRE.MatchString(s.Package) {
		add("spec.package", "%q is not a Rego package path such as writ.authz", s.Package)
	}
	if s.Decision != "" && !pkgRE.MatchString(s.Decision) {
		add("spec.decision", "%q is not a rule name", s.Decision)
	}
	if s.Mode != ModeEnforce && s.Mode != ModeDryRun {
		add("spec.mode", "mode %q is not enforce or dry-run", s.Mode)
	}
	for i, a := range s.Allow {
		for j, p := range a.Principals {
			if p != "*" && !strings.HasPrefix(p, "spiffe://") {
				add(fmt.Sprintf("spec.allow[%d].principals[%d]", i, j), "%q is not a SPIFFE ID or *", p)
			}
		}
	}
	if b := s.RequestBody; b != nil && (b.MaxBytes < 1 || b.MaxBytes > meshlimits.MaxRequestBodyBytes) {
		add("spec.requestBody.maxBytes", "%d: want 1 to %d (the sidecar holds this much of each request in memory)", b.MaxBytes, meshlimits.MaxRequestBodyBytes)
	}
}

// ServiceRef resolves a service reference written in namespace ns: "name"
// or "name.namespace".
func ServiceRef(ref, ns string) string {
	if strings.Contains(ref, ".") {
		return ref
	}
	return ref + "." + ns
}

// CheckMesh runs the cross-resource checks over a whole configuration:
// duplicate resources, references to services or subsets nobody declares,
// more than one Route or TrafficPolicy per service, and delegation loops
// (a route to another service whose own route leads back).
func CheckMesh(rs []*Resource) error {
	var errs Errors
	seen := map[string]*Resource{}
	services := map[string]*ServiceSpec{}
	for _, r := range rs {
		if prev, ok := seen[r.Key()]; ok {
			errs = append(errs, r.errAt("metadata.name", "%s is declared twice (also in %s)", r.Key(), where(prev)))
			continue
		}
		seen[r.Key()] = r
		if s, ok := r.Spec.(*ServiceSpec); ok {
			services[r.Ref()] = s
		}
	}
	routeOf := map[string]*Resource{}
	policyOf := map[string]*Resource{}
	edges := map[string][]string{}
	for _, r := range rs {
		ns := r.Metadata.Namespace
		checkSvc := func(field, ref string) (*ServiceSpec, string) {
			full := ServiceRef(ref, ns)
			s, ok := services[full]
			if !ok {
				errs = append(errs, r.errAt(field, "service %q is not declared (no Service %s in namespace %s)", ref, nameOf(full), nsOf(full)))
			}
			return s, full
		}
		checkSubset := func(field string, s *ServiceSpec, svc, subset string) {
			if s == nil || subset == "" {
				return
			}
			for _, ss := range s.Subsets {
				if ss.Name == subset {
					return
				}
			}
			errs = append(errs, r.errAt(field, "service %s has no subset %q (it declares %s)", svc, subset, subsetNames(s)))
		}
		switch s := r.Spec.(type) {
		case *RouteSpec:
			own, full := checkSvc("spec.service", s.Service)
			if prev, ok := routeOf[full]; ok {
				errs = append(errs, r.errAt("spec.service", "service %s already has Route %s (%s): one route per service", full, prev.Metadata.Name, where(prev)))
			}
			routeOf[full] = r
			for i, rule := range s.Rules {
				for j, d := range rule.Destinations {
					f := fmt.Sprintf("spec.rules[%d].destinations[%d]", i, j)
					ds, dfull := own, full
					if d.Service != "" {
						ds, dfull = checkSvc(f+".service", d.Service)
					}
					checkSubset(f+".subset", ds, dfull, d.Subset)
					if dfull != full && !slices.Contains(edges[full], dfull) {
						edges[full] = append(edges[full], dfull)
					}
				}
				if m := rule.Mirror; m != nil {
					ms, mfull := own, full
					if m.Service != "" {
						ms, mfull = checkSvc(fmt.Sprintf("spec.rules[%d].mirror.service", i), m.Service)
					}
					checkSubset(fmt.Sprintf("spec.rules[%d].mirror.subset", i), ms, mfull, m.Subset)
				}
			}
		case *TrafficPolicySpec:
			_, full := checkSvc("spec.service", s.Service)
			if prev, ok := policyOf[full]; ok {
				errs = append(errs, r.errAt("spec.service", "service %s already has TrafficPolicy %s (%s)", full, prev.Metadata.Name, where(prev)))
			}
			policyOf[full] = r
		case *AuthorizationPolicySpec:
			checkSvc("spec.service", s.Service)
		}
	}
	// Delegation loops: depth-first search over service -> routed service.
	state := map[string]int{} // 1 visiting, 2 done
	var stack []string
	var visit func(n string) bool
	visit = func(n string) bool {
		state[n] = 1
		stack = append(stack, n)
		for _, m := range edges[n] {
			if state[m] == 1 {
				i := slices.Index(stack, m)
				cycle := append(slices.Clone(stack[i:]), m)
				r := routeOf[n]
				errs = append(errs, r.errAt("spec.rules", "routing loop: %s", strings.Join(cycle, " -> ")))
				return true
			}
			if state[m] == 0 && visit(m) {
				return true
			}
		}
		stack = stack[:len(stack)-1]
		state[n] = 2
		return false
	}
	keys := make([]string, 0, len(edges))
	for k := range edges {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if state[k] == 0 {
			visit(k)
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

func where(r *Resource) string {
	if r.File == "" {
		return "stored"
	}
	if r.node != nil {
		return fmt.Sprintf("%s:%d", r.File, r.node.Line)
	}
	return r.File
}

func nameOf(full string) string { n, _, _ := strings.Cut(full, "."); return n }
func nsOf(full string) string   { _, ns, _ := strings.Cut(full, "."); return ns }

func subsetNames(s *ServiceSpec) string {
	if len(s.Subsets) == 0 {
		return "no subsets"
	}
	var n []string
	for _, ss := range s.Subsets {
		n = append(n, ss.Name)
	}
	return strings.Join(n, ", ")
}

// MarshalYAMLDoc renders resources as a multi-document YAML file.
func MarshalYAMLDoc(rs []*Resource) ([]byte, error) {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	for _, r := range rs {
		if err := enc.Encode(r); err != nil {
			return nil, err
		}
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// MarshalJSON writes the duration as Go duration text, as in YAML.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads Go duration text.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration such as 90s: %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}
