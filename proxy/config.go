package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"gopkg.in/yaml.v3"

	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/internal/meshlimits"
	"github.com/writmesh/writ/internal/saferegex"
)

// Config is everything the data plane routes by. Its shapes follow Envoy's
// resources (listeners, route configurations with virtual hosts, clusters
// with endpoints) so that the xDS client (proxy/xdsclient) fills it from
// the resources writd serves; tests may write it as YAML. A Config is
// immutable once handed to the proxy.
type Config struct {
	// Inbound listeners terminate mTLS from other sidecars.
	Inbound []Inbound `yaml:"inbound" json:"inbound"`
	// Outbound listeners take plaintext from the local application.
	Outbound []Outbound    `yaml:"outbound" json:"outbound"`
	Routes   []RouteConfig `yaml:"routes" json:"routes"`
	Clusters []Cluster     `yaml:"clusters" json:"clusters"`
}

// Inbound is a mesh port: it terminates mTLS with the workload's SVID,
// authorizes every HTTP request (and every TCP connection) with the
// enforcer and forwards to the local application.
type Inbound struct {
	Name    string `yaml:"name" json:"name"`
	Address string `yaml:"address" json:"address"`
	// Service is the local service's name, given to policy as
	// input.writ.destination_service.
	Service string `yaml:"service" json:"service"`
	// App is the local application's host:port.
	App string `yaml:"app" json:"app"`
	// AppProtocol is how HTTP reaches the app: "http1" (default) or "h2c".
	// gRPC always goes over h2c.
	AppProtocol string `yaml:"app_protocol" json:"app_protocol,omitempty"`
	// AuthzMode is the mode of the AuthorizationPolicies bound to the
	// service (writd's ext_authz context extension writ.authz_mode):
	// "enforce" (or empty) denies what policy denies, "dry-run" evaluates
	// and records every request but never denies on policy's word.
	AuthzMode string `yaml:"authz_mode" json:"authz_mode,omitempty"`
	// AuthzDecision is the Rego query those policies bind (writ.
	// authz_decision, e.g. data.envoy.authz.allow). The proxy decides by
	// its policy's one decision path, so a configuration binding another
	// is refused rather than decided by the wrong rule.
	AuthzDecision string `yaml:"authz_decision" json:"authz_decision,omitempty"`
	// AuthzDryRun is the queries of the dry-run policies bound beside
	// enforced ones (writ.authz_dry_run): evaluated on every request and
	// recorded in the decision, never enforced.
	AuthzDryRun string `yaml:"authz_dry_run" json:"authz_dry_run,omitempty"`
	// RequestBody is ext_authz's with_request_body: the body policy sees.
	// Zero MaxBytes (the default) hands policy no body and buffers
	// nothing.
	RequestBody RequestBody `yaml:"request_body" json:"request_body,omitzero"`
}

// RequestBody is Envoy's ext_authz BufferSettings. A request with a body
// is held until MaxBytes of it (or all of it, if shorter) have arrived;
// they go to the enforcer as the CheckRequest's body (raw_body with
// PackAsBytes) and then, followed by the rest as it streams, to the app.
// A longer body is answered 413 before the check unless
// AllowPartialMessage, which checks the first MaxBytes and says so in
// the x-envoy-auth-partial-body header, as Envoy does. It is a value, so
// that Update can compare listeners with ==.
type RequestBody struct {
	MaxBytes            int  `yaml:"max_request_bytes" json:"max_request_bytes,omitempty"`
	AllowPartialMessage bool `yaml:"allow_partial_message" json:"allow_partial_message,omitempty"`
	PackAsBytes         bool `yaml:"pack_as_bytes" json:"pack_as_bytes,omitempty"`
}

// Outbound is a local plaintext port of the application's.
type Outbound struct {
	Name    string `yaml:"name" json:"name"`
	Address string `yaml:"address" json:"address"`
	// Protocol is "http" (HTTP/1.1 and h2c, routed by Route), "tcp"
	// (spliced to Cluster) or "transparent": connections redirected here
	// by iptables or ip6tables are spliced to the cluster whose Addresses
	// hold their original destination (SO_ORIGINAL_DST, Linux, IPv4 and
	// IPv6; a listener takes the family of its address).
	Protocol string `yaml:"protocol" json:"protocol"`
	// Route names a RouteConfig (http).
	Route string `yaml:"route" json:"route,omitempty"`
	// Cluster names the cluster of a tcp listener.
	Cluster string `yaml:"cluster" json:"cluster,omitempty"`
}

// RouteConfig is Envoy's RouteConfiguration: virtual hosts chosen by the
// request's Host.
type RouteConfig struct {
	Name         string        `yaml:"name" json:"name"`
	VirtualHosts []VirtualHost `yaml:"virtual_hosts" json:"virtual_hosts"`
}

// VirtualHost matches Domains ("*" matches any host; a port in the Host is
// ignored) and holds routes tried in order.
type VirtualHost struct {
	Name    string   `yaml:"name" json:"name"`
	Domains []string `yaml:"domains" json:"domains"`
	Routes  []Route  `yaml:"routes" json:"routes"`
}

// Route sends requests whose path matches (exactly one of Prefix, Path
// and Regex) and whose headers match Headers to one of Clusters, chosen by
// weight. As in Envoy the path is matched without the query string, and a
// virtual host's routes are tried in order: the first match wins.
type Route struct {
	Prefix string `yaml:"prefix" json:"prefix,omitempty"`
	// Path must equal the request's path (Envoy's path).
	Path string `yaml:"path" json:"path,omitempty"`
	// Regex must match the whole path (Envoy's safe_regex: RE2 syntax,
	// which is Go's regexp); at most MaxRegexLen bytes.
	Regex    string            `yaml:"regex" json:"regex,omitempty"`
	Headers  []HeaderMatch     `yaml:"headers" json:"headers,omitempty"`
	Clusters []WeightedCluster `yaml:"clusters" json:"clusters"`
	// Timeout bounds the whole request, retries included; zero is 15 s
	// as in Envoy.
	Timeout Duration     `yaml:"timeout" json:"timeout,omitempty"`
	Retry   *RetryPolicy `yaml:"retry" json:"retry,omitempty"`
	Fault   *Fault       `yaml:"fault" json:"fault,omitempty"`
	Mirror  *Mirror      `yaml:"mirror" json:"mirror,omitempty"`
	// HashHeader names the header whose value keys RING_HASH clusters
	// (Envoy's hash_policy with a header).
	HashHeader string `yaml:"hash_header" json:"hash_header,omitempty"`
	// HashSource keys RING_HASH clusters by the client's address
	// (Envoy's connection_properties source_ip hash policy): in a
	// sidecar, every request of the local app goes to one endpoint.
	HashSource bool `yaml:"hash_source" json:"hash_source,omitempty"`

	re *regexp.Regexp // Regex, compiled by Validate
}

// matchPath reports whether path (without its query) is the route's.
func (r *Route) matchPath(path string) bool {
	switch {
	case r.Regex != "":
		// Not compiled means not validated: match nothing rather than
		// guess.
		return r.re != nil && r.re.MatchString(path)
	case r.Path != "":
		return path == r.Path
	}
	return strings.HasPrefix(path, r.Prefix)
}

// Mirror is Envoy's request mirror policy: a copy of Percent of the
// requests goes to Cluster with "-shadow" appended to its Host; the
// response is discarded and the original never waits for it. Requests
// whose body is larger than 64 KiB or unsized are not mirrored.
type Mirror struct {
	Cluster string  `yaml:"cluster" json:"cluster"`
	Percent float64 `yaml:"percent" json:"percent"`
}

// Fault is Envoy's HTTP fault injection on a route: a share of requests is
// delayed, a share is answered with AbortStatus (or, for gRPC, with
// AbortGRPCStatus in a trailers-only response) without reaching the
// upstream. Percentages are 0 to 100.
type Fault struct {
	DelayPercent float64  `yaml:"delay_percent" json:"delay_percent,omitempty"`
	Delay        Duration `yaml:"delay" json:"delay,omitempty"`
	AbortPercent float64  `yaml:"abort_percent" json:"abort_percent,omitempty"`
	AbortStatus  int      `yaml:"abort_status" json:"abort_status,omitempty"`
	// AbortGRPCStatus, when set instead of AbortStatus, is a gRPC status
	// code (1 to 16).
	AbortGRPCStatus int `yaml:"abort_grpc_status" json:"abort_grpc_status,omitempty"`
}

// HeaderMatch is Envoy's header matcher: the header's value (its values
// joined by ",", as Envoy does) is Exact, starts with Prefix, ends with
// Suffix, contains Contains, or wholly matches Regex; with none of them
// set the header only has to be Present. IgnoreCase compares Exact,
// Prefix, Suffix and Contains without regard to ASCII case. Invert
// negates the match, so an inverted presence match means "absent". Name
// is a regular header or one of the pseudo-headers ":method" and
// ":authority".
type HeaderMatch struct {
	Name       string `yaml:"name" json:"name"`
	Exact      string `yaml:"exact" json:"exact,omitempty"`
	Prefix     string `yaml:"prefix" json:"prefix,omitempty"`
	Suffix     string `yaml:"suffix" json:"suffix,omitempty"`
	Contains   string `yaml:"contains" json:"contains,omitempty"`
	Regex      string `yaml:"regex" json:"regex,omitempty"`
	IgnoreCase bool   `yaml:"ignore_case" json:"ignore_case,omitempty"`
	Invert     bool   `yaml:"invert" json:"invert,omitempty"`

	re  *regexp.Regexp // Regex, compiled by Validate
	key string         // Name canonicalized by Validate, spared per request
}

// MaxRegexLen bounds the regular expressions of routes and header
// matches; the mesh config's validation refuses the same patterns at
// apply time (internal/saferegex).
const MaxRegexLen = saferegex.MaxLen

// compileRegex compiles an RE2 pattern anchored at both ends, as Envoy's
// safe_regex matches the whole value, within saferegex's bounds.
func compileRegex(pattern string) (*regexp.Regexp, error) { return saferegex.Compile(pattern) }

// matches reports whether the request with method, host and headers h
// matches.
func (m *HeaderMatch) matches(method, host string, h http.Header) bool {
	var v string
	var ok bool
	switch m.Name {
	case ":method":
		v, ok = method, true
	case ":authority":
		v, ok = host, true
	default:
		key := m.key
		if key == "" {
			key = http.CanonicalHeaderKey(m.Name)
		}
		var vs []string
		vs, ok = h[key]
		if len(vs) == 1 {
			v = vs[0]
		} else {
			v = strings.Join(vs, ",")
		}
	}
	var hit bool
	switch {
	case !ok:
	case m.Exact != "":
		hit = v == m.Exact || m.IgnoreCase && strings.EqualFold(v, m.Exact)
	case m.Prefix != "":
		hit = strings.HasPrefix(v, m.Prefix) || m.IgnoreCase && len(v) >= len(m.Prefix) && strings.EqualFold(v[:len(m.Prefix)], m.Prefix)
	case m.Suffix != "":
		hit = strings.HasSuffix(v, m.Suffix) || m.IgnoreCase && len(v) >= len(m.Suffix) && strings.EqualFold(v[len(v)-len(m.Suffix):], m.Suffix)
	case m.Contains != "":
		hit = strings.Contains(v, m.Contains) || m.IgnoreCase && strings.Contains(strings.ToLower(v), strings.ToLower(m.Contains))
	case m.Regex != "":
		hit = m.re != nil && m.re.MatchString(v)
	default:
		hit = true
	}
	return hit != m.Invert
}

// WeightedCluster is one target of a route.
type WeightedCluster struct {
	Name   string `yaml:"name" json:"name"`
	Weight uint32 `yaml:"weight" json:"weight"`
}

// RetryPolicy is Envoy's retry policy: attempts after the first, each
// bounded by PerTryTimeout, spaced by exponential backoff with full
// jitter between BaseInterval and MaxInterval.
type RetryPolicy struct {
	// RetryOn lists the conditions: "5xx", "gateway-error",
	// "connect-failure", "reset", "retriable-4xx" (409), and the gRPC
	// ones on the grpc-status of a trailers-only response: "cancelled",
	// "deadline-exceeded", "internal", "resource-exhausted",
	// "unavailable".
	RetryOn       []string `yaml:"retry_on" json:"retry_on"`
	NumRetries    int      `yaml:"num_retries" json:"num_retries"`
	PerTryTimeout Duration `yaml:"per_try_timeout" json:"per_try_timeout,omitempty"`
	BaseInterval  Duration `yaml:"base_interval" json:"base_interval,omitempty"`
	MaxInterval   Duration `yaml:"max_interval" json:"max_interval,omitempty"`
}

// Cluster is a set of peer sidecars serving one service.
type Cluster struct {
	Name string `yaml:"name" json:"name"`
	// LBPolicy is "ROUND_ROBIN" (default), "LEAST_REQUEST" (power of two
	// choices) or "RING_HASH" (consistent hashing on the route's
	// HashHeader; requests without the header are spread round robin).
	LBPolicy       string     `yaml:"lb_policy" json:"lb_policy"`
	ConnectTimeout Duration   `yaml:"connect_timeout" json:"connect_timeout,omitempty"`
	Endpoints      []Endpoint `yaml:"endpoints" json:"endpoints"`
	// PeerIDs are the SPIFFE IDs the peers must present (Envoy's
	// match_typed_subject_alt_names); at least one is required.
	PeerIDs []string `yaml:"peer_ids" json:"peer_ids"`
	// Addresses are the service addresses (host:port) applications dial,
	// by which transparent listeners find the cluster: IP:port, IPv6 in
	// brackets; an IPv4-mapped IPv6 address matches its IPv4 form, and
	// zones are ignored.
	Addresses []string `yaml:"addresses" json:"addresses,omitempty"`
	// CircuitBreakers bound the cluster's connections and concurrency;
	// nil takes Envoy's defaults (1024 connections, 1024 pending and 1024
	// requests, 3 concurrent retries).
	CircuitBreakers *CircuitBreakers `yaml:"circuit_breakers" json:"circuit_breakers,omitempty"`
	// OutlierDetection ejects endpoints that keep failing; nil disables it.
	OutlierDetection *OutlierDetection `yaml:"outlier_detection" json:"outlier_detection,omitempty"`
	// HealthCheck actively probes every endpoint; nil disables it.
	HealthCheck *HealthCheck `yaml:"health_check" json:"health_check,omitempty"`
	// HTTP2 sends every request to the peers as a stream of one
	// multiplexed HTTP/2 connection per endpoint, whatever the app spoke
	// (Envoy's explicit http2_protocol_options; writd sets it for http2
	// and grpc service ports). Otherwise the hop keeps the app's protocol:
	// HTTP/1.1 requests travel over pooled HTTP/1.1 connections, which in
	// Go's HTTP stacks cost about 2/3 of the CPU of HTTP/2 streams.
	HTTP2 bool `yaml:"http2" json:"http2,omitempty"`
}

// HealthCheck is an active check of each endpoint every Interval: a
// connection and mTLS handshake with the peer sidecar, which must present
// one of the cluster's peer IDs, within Timeout. UnhealthyThreshold
// failures in a row take an endpoint out of the pool, HealthyThreshold
// successes bring it back. Endpoints start healthy.
//
// With HTTPPath set the check is an HTTP GET of that path (Host: HTTPHost,
// else the cluster's name, as Envoy does) over the mTLS connection, and
// the answer's status must be in ExpectedStatuses (default 200 only, as
// Envoy). With GRPC set it is grpc.health.v1.Health/Check for
// GRPCService, which must answer SERVING. Either way the check is a
// request like any other from this workload: it passes through the peer
// sidecar's inbound listener, is decided by the peer's policy (which must
// allow this workload that path) and answered by the peer's app — so a
// healthy endpoint is one whose app answers, not merely whose sidecar
// does.
type HealthCheck struct {
	Interval           Duration `yaml:"interval" json:"interval"`
	Timeout            Duration `yaml:"timeout" json:"timeout"`
	UnhealthyThreshold int      `yaml:"unhealthy_threshold" json:"unhealthy_threshold"`
	HealthyThreshold   int      `yaml:"healthy_threshold" json:"healthy_threshold"`

	HTTPPath         string        `yaml:"http_path" json:"http_path,omitempty"`
	HTTPHost         string        `yaml:"http_host" json:"http_host,omitempty"`
	ExpectedStatuses []StatusRange `yaml:"expected_statuses" json:"expected_statuses,omitempty"`
	GRPC             bool          `yaml:"grpc" json:"grpc,omitempty"`
	GRPCService      string        `yaml:"grpc_service" json:"grpc_service,omitempty"`
}

// StatusRange is the HTTP statuses [Start, End).
type StatusRange struct {
	Start int `yaml:"start" json:"start"`
	End   int `yaml:"end" json:"end"`
}

// CircuitBreakers are Envoy's thresholds. Requests beyond MaxRequests in
// flight (pending ones included) are refused with 503 at once, and a
// failed first try is not retried while MaxRetries requests of the
// cluster are retrying. MaxConnections bounds the cluster's upstream
// connections across its endpoints (each of the proxy's pools may still
// open one to an endpoint it has none to, as Envoy's pools may); a
// request that finds no idle connection at that bound waits for one as
// a pending request, and beyond MaxPendingRequests waiting it is refused
// with 503 at once. Zero takes Envoy's defaults (1024 connections, 1024
// pending, 1024 requests, 3 retries).
type CircuitBreakers struct {
	MaxConnections     int `yaml:"max_connections" json:"max_connections,omitempty"`
	MaxPendingRequests int `yaml:"max_pending_requests" json:"max_pending_requests,omitempty"`
	MaxRequests        int `yaml:"max_requests" json:"max_requests"`
	MaxRetries         int `yaml:"max_retries" json:"max_retries"`
	// RetryBudgetPercent, when set, replaces MaxRetries by Envoy's retry
	// budget: retrying requests may be that share of the requests in
	// flight, and at least MinRetryConcurrency (default 3).
	RetryBudgetPercent  float64 `yaml:"retry_budget_percent" json:"retry_budget_percent,omitempty"`
	MinRetryConcurrency int     `yaml:"min_retry_concurrency" json:"min_retry_concurrency,omitempty"`
}

// OutlierDetection is Envoy's consecutive-failure detection. An endpoint
// is ejected after Consecutive5xx failures in a row (5xx answers, failed
// connections, resets and timeouts) or ConsecutiveGatewayFailure gateway
// failures in a row (502, 503, 504, failed connections, resets and
// timeouts; any other answer breaks the run), each enforced on its
// Enforcing share of the events (percent; 5xx defaults to 100, gateway
// failures to 0 as in Envoy: a detector that is only configured counts
// but does not eject). An ejection lasts BaseEjectionTime times the
// endpoint's backoff, which grows by one per ejection and shrinks by one
// for every Interval the endpoint then stays in the pool, capped at
// MaxEjectionTime (default the larger of 300 s and BaseEjectionTime). As
// in Envoy, an ejected endpoint returns at the first sweep, every
// Interval (default 10 s) from when the cluster was configured, at which
// its ejection time has passed. At most MaxEjectionPercent of the
// endpoints are out at once (at least one, as in Envoy).
//
// Two more detectors judge each Interval's tries at the sweep that ends
// it; a try fails if it answers 5xx or fails before an answer (failed
// connection, reset, timeout; Envoy's split_external_local_origin_errors
// off). Success rate: among the endpoints with at least
// SuccessRateRequestVolume tries (default 100), if there are at least
// SuccessRateMinimumHosts (default 5), one whose success rate is below
// the mean minus SuccessRateStdevFactor/1000 (default 1900) standard
// deviations is ejected on EnforcingSuccessRate percent of the occasions
// (default 100). Failure percentage: among the endpoints with at least
// FailurePercentageRequestVolume tries (default 50), if there are at least
// FailurePercentageMinimumHosts (default 5), one whose share of failed
// tries is FailurePercentageThreshold percent (default 85) or more is
// ejected on EnforcingFailurePercentage percent of the occasions
// (default 0: off). Zero counts, volumes and factor take the defaults.
type OutlierDetection struct {
	Consecutive5xx                     int      `yaml:"consecutive_5xx" json:"consecutive_5xx"`
	ConsecutiveGatewayFailure          int      `yaml:"consecutive_gateway_failure" json:"consecutive_gateway_failure,omitempty"`
	EnforcingConsecutive5xx            *int     `yaml:"enforcing_consecutive_5xx" json:"enforcing_consecutive_5xx,omitempty"`
	EnforcingConsecutiveGatewayFailure int      `yaml:"enforcing_consecutive_gateway_failure" json:"enforcing_consecutive_gateway_failure,omitempty"`
	Interval                           Duration `yaml:"interval" json:"interval,omitempty"`
	BaseEjectionTime                   Duration `yaml:"base_ejection_time" json:"base_ejection_time"`
	MaxEjectionTime                    Duration `yaml:"max_ejection_time" json:"max_ejection_time,omitempty"`
	MaxEjectionPercent                 int      `yaml:"max_ejection_percent" json:"max_ejection_percent"`

	EnforcingSuccessRate           *int `yaml:"enforcing_success_rate" json:"enforcing_success_rate,omitempty"`
	SuccessRateMinimumHosts        int  `yaml:"success_rate_minimum_hosts" json:"success_rate_minimum_hosts,omitempty"`
	SuccessRateRequestVolume       int  `yaml:"success_rate_request_volume" json:"success_rate_request_volume,omitempty"`
	SuccessRateStdevFactor         int  `yaml:"success_rate_stdev_factor" json:"success_rate_stdev_factor,omitempty"`
	EnforcingFailurePercentage     int  `yaml:"enforcing_failure_percentage" json:"enforcing_failure_percentage,omitempty"`
	FailurePercentageThreshold     *int `yaml:"failure_percentage_threshold" json:"failure_percentage_threshold,omitempty"`
	FailurePercentageMinimumHosts  int  `yaml:"failure_percentage_minimum_hosts" json:"failure_percentage_minimum_hosts,omitempty"`
	FailurePercentageRequestVolume int  `yaml:"failure_percentage_request_volume" json:"failure_percentage_request_volume,omitempty"`
}

// Endpoint is a peer sidecar's mesh port.
type Endpoint struct {
	Address string `yaml:"address" json:"address"`
}

// Authorization modes of an inbound listener.
const (
	AuthzEnforce = "enforce"
	AuthzDryRun  = enforcer.ModeDryRun
)

// LB policies.
const (
	RoundRobin   = "ROUND_ROBIN"
	LeastRequest = "LEAST_REQUEST"
	RingHash     = "RING_HASH"
)

// Duration is a time.Duration written as "1.5s" in YAML and JSON.
type Duration time.Duration

// UnmarshalText parses a Go duration.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	if v < 0 {
		return fmt.Errorf("negative duration %s", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes a Go duration.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// LoadConfig reads a YAML Config strictly: unknown keys and trailing
// documents are errors.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read proxy config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("proxy config %s: %w", path, err)
	}
	var extra any
	if err := dec.Decode(&extra); err == nil {
		return nil, fmt.Errorf("proxy config %s: more than one document", path)
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("proxy config %s: %w", path, err)
	}
	return &c, nil
}

// Validate checks names, references and addresses, so that a bad
// configuration is refused before it replaces a good one, and compiles
// the regular expressions of its routes (once: validating a Config
// again, as New and Update do, only reads them). A route whose regex was
// never compiled matches nothing.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	clusters := map[string]bool{}
	addrs := map[string]string{}
	for i, cl := range c.Clusters {
		where := fmt.Sprintf("clusters[%d] %q", i, cl.Name)
		if cl.Name == "" || clusters[cl.Name] {
			bad("%s: empty or duplicate name", where)
		}
		clusters[cl.Name] = true
		if cl.LBPolicy != "" && cl.LBPolicy != RoundRobin && cl.LBPolicy != LeastRequest && cl.LBPolicy != RingHash {
			bad("%s: lb_policy %q: want %s, %s or %s", where, cl.LBPolicy, RoundRobin, LeastRequest, RingHash)
		}
		if len(cl.PeerIDs) == 0 {
			bad("%s: peer_ids: at least one SPIFFE ID is required", where)
		}
		for _, id := range cl.PeerIDs {
			if _, err := spiffeid.FromString(id); err != nil {
				bad("%s: peer_ids: %q: %v", where, id, err)
			}
		}
		if cb := cl.CircuitBreakers; cb != nil && (cb.MaxConnections < 0 || cb.MaxPendingRequests < 0 || cb.MaxRequests < 0 || cb.MaxRetries < 0 || cb.RetryBudgetPercent < 0 || cb.RetryBudgetPercent > 100 || cb.MinRetryConcurrency < 0) {
			bad("%s: circuit_breakers: negative threshold", where)
		}
		if od := cl.OutlierDetection; od != nil && (od.Consecutive5xx < 0 || od.ConsecutiveGatewayFailure < 0 || od.MaxEjectionPercent < 0 || od.MaxEjectionPercent > 100 ||
			od.EnforcingConsecutive5xx != nil && (*od.EnforcingConsecutive5xx < 0 || *od.EnforcingConsecutive5xx > 100) || od.EnforcingConsecutiveGatewayFailure < 0 || od.EnforcingConsecutiveGatewayFailure > 100 ||
			od.EnforcingSuccessRate != nil && (*od.EnforcingSuccessRate < 0 || *od.EnforcingSuccessRate > 100) || od.EnforcingFailurePercentage < 0 || od.EnforcingFailurePercentage > 100 ||
			od.FailurePercentageThreshold != nil && (*od.FailurePercentageThreshold < 0 || *od.FailurePercentageThreshold > 100) || od.SuccessRateMinimumHosts < 0 || od.SuccessRateRequestVolume < 0 || od.SuccessRateStdevFactor < 0 ||
			od.FailurePercentageMinimumHosts < 0 || od.FailurePercentageRequestVolume < 0) {
			bad("%s: outlier_detection: counts and volumes >= 0, percentages 0 to 100", where)
		}
		if hc := cl.HealthCheck; hc != nil && (hc.Interval <= 0 || hc.UnhealthyThreshold < 0 || hc.HealthyThreshold < 0) {
			bad("%s: health_check: interval is required and thresholds must not be negative", where)
		}
		if hc := cl.HealthCheck; hc != nil {
			if hc.HTTPPath != "" && (hc.GRPC || !strings.HasPrefix(hc.HTTPPath, "/")) {
				bad("%s: health_check: http_path %q must start with / and excludes grpc", where, hc.HTTPPath)
			}
			for _, r := range hc.ExpectedStatuses {
				if r.Start < 100 || r.End > 600 || r.Start >= r.End {
					bad("%s: health_check: expected status range [%d, %d) is not within [100, 600)", where, r.Start, r.End)
				}
			}
		}
		for _, a := range cl.Addresses {
			host, _, err := net.SplitHostPort(a)
			if err != nil {
				bad("%s: address %q: %v", where, a, err)
			}
			// An IP address is compared in its serviceAddr form, so that
			// 127.0.0.5:80 and [::ffff:127.0.0.5]:80 are one address.
			key := a
			if _, err := netip.ParseAddr(host); err == nil {
				k, ok := serviceAddr(a)
				if !ok {
					bad("%s: address %q: want IP:port with a numeric port", where, a)
				}
				key = k.String()
			}
			if addrs[key] != "" {
				bad("%s: address %q is also cluster %q's", where, a, addrs[key])
			}
			addrs[key] = cl.Name
		}
		for _, ep := range cl.Endpoints {
			if _, _, err := net.SplitHostPort(ep.Address); err != nil {
				bad("%s: endpoint %q: %v", where, ep.Address, err)
			}
		}
	}
	routes := map[string]bool{}
	for i, rc := range c.Routes {
		where := fmt.Sprintf("routes[%d] %q", i, rc.Name)
		if rc.Name == "" || routes[rc.Name] {
			bad("%s: empty or duplicate name", where)
		}
		routes[rc.Name] = true
		for _, vh := range rc.VirtualHosts {
			if len(vh.Domains) == 0 {
				bad("%s: virtual host %q has no domains", where, vh.Name)
			}
			for j := range vh.Routes {
				r := &vh.Routes[j]
				switch n := btoi(r.Prefix != "") + btoi(r.Path != "") + btoi(r.Regex != ""); {
				case n != 1:
					bad("%s: virtual host %q route %d: want exactly one of prefix, path and regex", where, vh.Name, j)
				case r.Regex != "" && r.re == nil:
					re, err := compileRegex(r.Regex)
					if err != nil {
						bad("%s: virtual host %q route %d: %v", where, vh.Name, j, err)
					}
					r.re = re
				case r.Regex != "":
				case !strings.HasPrefix(r.Prefix+r.Path, "/"):
					bad("%s: virtual host %q route %d: path %q must start with /", where, vh.Name, j, r.Prefix+r.Path)
				}
				for k := range r.Headers {
					hm := &r.Headers[k]
					if hm.Name == "" || strings.HasPrefix(hm.Name, ":") && hm.Name != ":method" && hm.Name != ":authority" {
						bad("%s: virtual host %q route %d: header match needs a regular header name, :method or :authority, not %q", where, vh.Name, j, hm.Name)
					}
					if n := btoi(hm.Exact != "") + btoi(hm.Prefix != "") + btoi(hm.Suffix != "") + btoi(hm.Contains != "") + btoi(hm.Regex != ""); n > 1 {
						bad("%s: virtual host %q route %d: header %q: at most one of exact, prefix, suffix, contains and regex", where, vh.Name, j, hm.Name)
					}
					if hm.key == "" && !strings.HasPrefix(hm.Name, ":") {
						hm.key = http.CanonicalHeaderKey(hm.Name)
					}
					if hm.Regex != "" && hm.re == nil {
						re, err := compileRegex(hm.Regex)
						if err != nil {
							bad("%s: virtual host %q route %d: header %q: %v", where, vh.Name, j, hm.Name, err)
						}
						hm.re = re
					}
				}
				var total uint64
				for _, wc := range r.Clusters {
					if !clusters[wc.Name] {
						bad("%s: virtual host %q route %d: unknown cluster %q", where, vh.Name, j, wc.Name)
					}
					total += uint64(wc.Weight)
				}
				if len(r.Clusters) == 0 || (len(r.Clusters) > 1 && total == 0) {
					bad("%s: virtual host %q route %d: no cluster with weight", where, vh.Name, j)
				}
				if m := r.Mirror; m != nil && (!clusters[m.Cluster] || m.Percent < 0 || m.Percent > 100) {
					bad("%s: virtual host %q route %d: mirror: unknown cluster %q or percent outside 0 to 100", where, vh.Name, j, m.Cluster)
				}
				if f := r.Fault; f != nil {
					if f.DelayPercent < 0 || f.DelayPercent > 100 || f.AbortPercent < 0 || f.AbortPercent > 100 {
						bad("%s: virtual host %q route %d: fault percentages must be 0 to 100", where, vh.Name, j)
					}
					switch {
					case f.AbortGRPCStatus != 0 && (f.AbortStatus != 0 || f.AbortGRPCStatus < meshlimits.MinGRPCStatus || f.AbortGRPCStatus > meshlimits.MaxGRPCStatus):
						bad("%s: virtual host %q route %d: fault abort_grpc_status %d: want %d to %d and no abort_status", where, vh.Name, j, f.AbortGRPCStatus, meshlimits.MinGRPCStatus, meshlimits.MaxGRPCStatus)
					case f.AbortGRPCStatus == 0 && f.AbortPercent > 0 && (f.AbortStatus < 200 || f.AbortStatus > 599):
						bad("%s: virtual host %q route %d: fault abort_status %d is not an HTTP status", where, vh.Name, j, f.AbortStatus)
					}
				}
				if rp := r.Retry; rp != nil {
					for _, on := range rp.RetryOn {
						if _, grpc := grpcRetryCodes[on]; !grpc && !slices.Contains([]string{"5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx"}, on) {
							bad("%s: virtual host %q route %d: retry_on %q unknown", where, vh.Name, j, on)
						}
					}
					if rp.NumRetries < 0 || rp.NumRetries > meshlimits.MaxRetries {
						bad("%s: virtual host %q route %d: num_retries %d: want 0 to %d", where, vh.Name, j, rp.NumRetries, meshlimits.MaxRetries)
					}
				}
			}
		}
	}
	names := map[string]bool{}
	listener := func(kind string, i int, name, addr string) string {
		where := fmt.Sprintf("%s[%d] %q", kind, i, name)
		if name == "" || names[name] {
			bad("%s: empty or duplicate listener name", where)
		}
		names[name] = true
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad("%s: address %q: %v", where, addr, err)
		}
		return where
	}
	for i, in := range c.Inbound {
		where := listener("inbound", i, in.Name, in.Address)
		if _, _, err := net.SplitHostPort(in.App); err != nil {
			bad("%s: app %q: %v", where, in.App, err)
		}
		if in.AppProtocol != "" && in.AppProtocol != "http1" && in.AppProtocol != "h2c" {
			bad("%s: app_protocol %q: want http1 or h2c", where, in.AppProtocol)
		}
		if in.AuthzMode != "" && in.AuthzMode != AuthzEnforce && in.AuthzMode != AuthzDryRun {
			bad("%s: authz_mode %q: want %s or %s", where, in.AuthzMode, AuthzEnforce, AuthzDryRun)
		}
		if b := in.RequestBody; b.MaxBytes < 0 || b.MaxBytes > meshlimits.MaxRequestBodyBytes || b.MaxBytes == 0 && b != (RequestBody{}) {
			bad("%s: request_body: max_request_bytes %d: want 1 to %d", where, b.MaxBytes, meshlimits.MaxRequestBodyBytes)
		}
	}
	for i, out := range c.Outbound {
		where := listener("outbound", i, out.Name, out.Address)
		// An outbound port speaks with the workload's identity: reachable
		// from other hosts it would lend that identity to anyone.
		if host, _, err := net.SplitHostPort(out.Address); err == nil && !isLoopback(host) {
			bad("%s: address %q: outbound listeners must bind a loopback address", where, out.Address)
		}
		switch out.Protocol {
		case "http", "":
			if !routes[out.Route] {
				bad("%s: unknown route %q", where, out.Route)
			}
		case "tcp":
			if !clusters[out.Cluster] {
				bad("%s: unknown cluster %q", where, out.Cluster)
			}
		case "transparent":
		default:
			bad("%s: protocol %q: want http, tcp or transparent", where, out.Protocol)
		}
	}
	return errors.Join(errs...)
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// serviceAddr is the form in which a transparent listener looks up a
// cluster address (host:port): IPv4-mapped IPv6 addresses unmapped to
// IPv4 (an app may dial either form, and an IPv4 connection on an IPv6
// socket reports the mapped one) and zones dropped (a service address
// names a host, not a link). Host names are not IP addresses, so they are
// never an original destination: ok is false.
func serviceAddr(a string) (netip.AddrPort, bool) {
	ap, err := netip.ParseAddrPort(a)
	if err != nil {
		return netip.AddrPort{}, false
	}
	return serviceKey(ap), true
}

// serviceKey is ap in serviceAddr's form.
func serviceKey(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// defaultRetry is what Istio retries by default: a failed connection, on
// another endpoint, twice.
func defaultRetry() *RetryPolicy {
	return &RetryPolicy{RetryOn: []string{"connect-failure"}, NumRetries: 2}
}

// AddUpstream adds what the --upstream flag asks for: a local HTTP port
// whose every request goes to cluster name, retried on connection failures.
func (c *Config) AddUpstream(name, addr string) {
	c.Routes = append(c.Routes, RouteConfig{Name: "upstream:" + name, VirtualHosts: []VirtualHost{{
		Name: name, Domains: []string{"*"}, Routes: []Route{{Prefix: "/", Clusters: []WeightedCluster{{Name: name, Weight: 1}}, Retry: defaultRetry()}},
	}}})
	c.Outbound = append(c.Outbound, Outbound{Name: "upstream:" + name, Address: addr, Protocol: "http", Route: "upstream:" + name})
}

// AddHTTPProxy adds an HTTP proxy port: applications set HTTP_PROXY and
// call http://<cluster>/..., and the Host picks the cluster. Clusters that
// a route configuration already names keep that configuration's routes
// for their name.
func (c *Config) AddHTTPProxy(addr string) {
	rc := RouteConfig{Name: "http_proxy"}
	for _, cl := range c.Clusters {
		rc.VirtualHosts = append(rc.VirtualHosts, VirtualHost{
			Name: cl.Name, Domains: []string{cl.Name},
			Routes: []Route{{Prefix: "/", Clusters: []WeightedCluster{{Name: cl.Name, Weight: 1}}, Retry: defaultRetry()}},
		})
	}
	c.Routes = append(c.Routes, rc)
	c.Outbound = append(c.Outbound, Outbound{Name: "http_proxy", Address: addr, Protocol: "http", Route: "http_proxy"})
}
