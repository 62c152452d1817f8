package proxy

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/writmesh/writ/enforcer"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// This file is the translation the xDS client will use: Envoy route
// configurations, clusters and load assignments into the parts of a
// Config they determine. What Writ's data plane does not implement is an
// error naming the field, so that the client NACKs it instead of silently
// routing differently from what writd meant.

// faultFilterName is the key of the fault filter's per-route config.
const faultFilterName = "envoy.filters.http.fault"

// RoutesFromEnvoy translates route configurations.
func RoutesFromEnvoy(rcs []*routev3.RouteConfiguration) ([]RouteConfig, error) {
	var out []RouteConfig
	var errs []error
	for _, rc := range rcs {
		if err := rc.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("route configuration %q: %w", rc.GetName(), err))
			continue
		}
		r := RouteConfig{Name: rc.GetName()}
		for _, vh := range rc.GetVirtualHosts() {
			v := VirtualHost{Name: vh.GetName(), Domains: vh.GetDomains()}
			for i, er := range vh.GetRoutes() {
				rt, err := routeFromEnvoy(er)
				if err != nil {
					errs = append(errs, fmt.Errorf("route configuration %q virtual host %q route %d: %w", rc.GetName(), vh.GetName(), i, err))
					continue
				}
				v.Routes = append(v.Routes, rt)
			}
			r.VirtualHosts = append(r.VirtualHosts, v)
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

func routeFromEnvoy(er *routev3.Route) (Route, error) {
	var r Route
	m := er.GetMatch()
	switch ps := m.GetPathSpecifier().(type) {
	case nil:
		r.Prefix = "/"
	case *routev3.RouteMatch_Prefix:
		// Envoy's empty prefix matches every path, as "/" does.
		r.Prefix = cmp.Or(ps.Prefix, "/")
	case *routev3.RouteMatch_Path:
		if ps.Path == "" {
			return r, errors.New("match: empty path")
		}
		r.Path = ps.Path
	case *routev3.RouteMatch_SafeRegex:
		r.Regex = ps.SafeRegex.GetRegex()
		if _, err := compileRegex(r.Regex); err != nil {
			return r, fmt.Errorf("match: safe_regex: %w", err)
		}
	default:
		return r, errors.New("match: only prefix, path and safe_regex path matches are supported")
	}
	if m.GetCaseSensitive() != nil && !m.GetCaseSensitive().GetValue() {
		return r, errors.New("match: case-insensitive matching is not supported")
	}
	if len(m.GetQueryParameters()) > 0 || len(m.GetCookies()) > 0 || m.GetRuntimeFraction() != nil || m.GetGrpc() != nil || m.GetTlsContext() != nil || len(m.GetDynamicMetadata()) > 0 {
		return r, errors.New("match: only path and header matches are supported")
	}
	for _, hm := range m.GetHeaders() {
		h, err := headerFromEnvoy(hm)
		if err != nil {
			return r, fmt.Errorf("match: header %q: %w", hm.GetName(), err)
		}
		r.Headers = append(r.Headers, h)
	}
	a := er.GetRoute()
	if a == nil {
		return r, errors.New("action: only route actions are supported (no redirects or direct responses)")
	}
	switch {
	case a.GetCluster() != "":
		r.Clusters = []WeightedCluster{{Name: a.GetCluster(), Weight: 1}}
	case a.GetWeightedClusters() != nil:
		for _, c := range a.GetWeightedClusters().GetClusters() {
			r.Clusters = append(r.Clusters, WeightedCluster{Name: c.GetName(), Weight: c.GetWeight().GetValue()})
		}
	default:
		return r, errors.New("action: only cluster and weighted_clusters are supported")
	}
	if a.GetPrefixRewrite() != "" || a.GetRegexRewrite() != nil || a.GetHostRewriteLiteral() != "" {
		return r, errors.New("action: rewrites are not supported yet")
	}
	switch hp := a.GetHashPolicy(); {
	case len(hp) == 0:
	case len(hp) == 1 && hp[0].GetHeader() != nil:
		r.HashHeader = hp[0].GetHeader().GetHeaderName()
	case len(hp) == 1 && hp[0].GetConnectionProperties().GetSourceIp():
		r.HashSource = true
	default:
		return r, errors.New("action: hash_policy: only one header or source_ip hash policy is supported")
	}
	switch mp := a.GetRequestMirrorPolicies(); len(mp) {
	case 0:
	case 1:
		pct := 100.0
		if f := mp[0].GetRuntimeFraction(); f != nil {
			pct = percent(f.GetDefaultValue())
		}
		r.Mirror = &Mirror{Cluster: mp[0].GetCluster(), Percent: pct}
	default:
		return r, errors.New("action: at most one request mirror policy is supported")
	}
	r.Timeout = duration(a.GetTimeout())
	if rp := a.GetRetryPolicy(); rp != nil {
		p := &RetryPolicy{NumRetries: 1, PerTryTimeout: duration(rp.GetPerTryTimeout())}
		if n := rp.GetNumRetries(); n != nil {
			p.NumRetries = int(n.GetValue())
		}
		for _, on := range strings.Split(rp.GetRetryOn(), ",") {
			on = strings.TrimSpace(on)
			switch on {
			case "":
			case "5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx",
				"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable":
				p.RetryOn = append(p.RetryOn, on)
			case "refused-stream":
				// Go's HTTP/2 transport already retries a stream the peer
				// refused (REFUSED_STREAM: nothing was processed).
			default:
				return r, fmt.Errorf("retry_policy: retry_on %q is not supported", on)
			}
		}
		if bo := rp.GetRetryBackOff(); bo != nil {
			p.BaseInterval, p.MaxInterval = duration(bo.GetBaseInterval()), duration(bo.GetMaxInterval())
		}
		r.Retry = p
	}
	if anyCfg, ok := er.GetTypedPerFilterConfig()[faultFilterName]; ok {
		var f faultv3.HTTPFault
		if err := anyCfg.UnmarshalTo(&f); err != nil {
			return r, fmt.Errorf("fault: %w", err)
		}
		fault := &Fault{}
		if d := f.GetDelay(); d != nil {
			if d.GetFixedDelay() == nil {
				return r, errors.New("fault: only fixed delays are supported")
			}
			fault.Delay, fault.DelayPercent = duration(d.GetFixedDelay()), percent(d.GetPercentage())
		}
		if ab := f.GetAbort(); ab != nil {
			switch {
			case ab.GetHttpStatus() != 0:
				fault.AbortStatus = int(ab.GetHttpStatus())
			case ab.GetGrpcStatus() != 0:
				fault.AbortGRPCStatus = int(ab.GetGrpcStatus())
			default:
				return r, errors.New("fault: only http_status and grpc_status aborts are supported")
			}
			fault.AbortPercent = percent(ab.GetPercentage())
		}
		r.Fault = fault
	}
	return r, nil
}

// headerFromEnvoy translates a header matcher. Envoy matches "host" as
// the :authority pseudo-header, which is where Go keeps it too.
func headerFromEnvoy(hm *routev3.HeaderMatcher) (HeaderMatch, error) {
	h := HeaderMatch{Name: strings.ToLower(hm.GetName()), Invert: hm.GetInvertMatch()}
	if h.Name == "host" {
		h.Name = ":authority"
	}
	if strings.HasPrefix(h.Name, ":") && h.Name != ":method" && h.Name != ":authority" {
		return h, errors.New("only the :method and :authority pseudo-headers are supported")
	}
	if hm.GetTreatMissingHeaderAsEmpty() {
		return h, errors.New("treat_missing_header_as_empty is not supported")
	}
	var sm *matcherv3.StringMatcher
	switch spec := hm.GetHeaderMatchSpecifier().(type) {
	case nil:
		// No specifier: Envoy matches on presence.
	case *routev3.HeaderMatcher_PresentMatch:
		// present_match false matches an absent header.
		h.Invert = h.Invert != !spec.PresentMatch
	case *routev3.HeaderMatcher_StringMatch:
		sm = spec.StringMatch
	case *routev3.HeaderMatcher_ExactMatch:
		sm = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: spec.ExactMatch}}
	case *routev3.HeaderMatcher_PrefixMatch:
		sm = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: spec.PrefixMatch}}
	case *routev3.HeaderMatcher_SuffixMatch:
		sm = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: spec.SuffixMatch}}
	case *routev3.HeaderMatcher_ContainsMatch:
		sm = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: spec.ContainsMatch}}
	case *routev3.HeaderMatcher_SafeRegexMatch:
		sm = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: spec.SafeRegexMatch}}
	default:
		return h, errors.New("only present and string matches are supported")
	}
	if sm == nil {
		return h, nil
	}
	h.IgnoreCase = sm.GetIgnoreCase()
	switch p := sm.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		h.Exact = p.Exact
	case *matcherv3.StringMatcher_Prefix:
		h.Prefix = p.Prefix
	case *matcherv3.StringMatcher_Suffix:
		h.Suffix = p.Suffix
	case *matcherv3.StringMatcher_Contains:
		h.Contains = p.Contains
	case *matcherv3.StringMatcher_SafeRegex:
		h.Regex, h.IgnoreCase = p.SafeRegex.GetRegex(), false // ignore_case does not apply to regexes
		if _, err := compileRegex(h.Regex); err != nil {
			return h, fmt.Errorf("safe_regex: %w", err)
		}
	default:
		return h, errors.New("only exact, prefix, suffix, contains and safe_regex string matches are supported")
	}
	if h.Exact == "" && h.Prefix == "" && h.Suffix == "" && h.Contains == "" && h.Regex == "" {
		// An empty string would read as a presence match here.
		return h, errors.New("an empty string to match is not supported")
	}
	return h, nil
}

// ClustersFromEnvoy translates clusters, taking endpoints from each
// cluster's inline load_assignment or else from the load assignment of the
// same name (EDS).
func ClustersFromEnvoy(cs []*clusterv3.Cluster, las []*endpointv3.ClusterLoadAssignment) ([]Cluster, error) {
	byName := map[string]*endpointv3.ClusterLoadAssignment{}
	for _, la := range las {
		byName[la.GetClusterName()] = la
	}
	var out []Cluster
	var errs []error
	for _, ec := range cs {
		c, err := clusterFromEnvoy(ec, byName)
		if err != nil {
			errs = append(errs, fmt.Errorf("cluster %q: %w", ec.GetName(), err))
			continue
		}
		out = append(out, c)
	}
	return out, errors.Join(errs...)
}

func clusterFromEnvoy(ec *clusterv3.Cluster, las map[string]*endpointv3.ClusterLoadAssignment) (Cluster, error) {
	c := Cluster{Name: ec.GetName(), ConnectTimeout: duration(ec.GetConnectTimeout())}
	if err := ec.Validate(); err != nil {
		return c, err
	}
	switch ec.GetLbPolicy() {
	case clusterv3.Cluster_ROUND_ROBIN:
		c.LBPolicy = RoundRobin
	case clusterv3.Cluster_LEAST_REQUEST:
		c.LBPolicy = LeastRequest
	case clusterv3.Cluster_RING_HASH:
		c.LBPolicy = RingHash
	default:
		return c, fmt.Errorf("lb_policy %s is not supported", ec.GetLbPolicy())
	}
	for _, th := range ec.GetCircuitBreakers().GetThresholds() {
		if th.GetPriority() != 0 { // DEFAULT only
			continue
		}
		c.CircuitBreakers = &CircuitBreakers{}
		if v := th.GetMaxConnections(); v != nil {
			c.CircuitBreakers.MaxConnections = int(v.GetValue())
		}
		if v := th.GetMaxPendingRequests(); v != nil {
			c.CircuitBreakers.MaxPendingRequests = int(v.GetValue())
		}
		if v := th.GetMaxRequests(); v != nil {
			c.CircuitBreakers.MaxRequests = int(v.GetValue())
		}
		if v := th.GetMaxRetries(); v != nil {
			c.CircuitBreakers.MaxRetries = int(v.GetValue())
		}
		if rb := th.GetRetryBudget(); rb != nil {
			c.CircuitBreakers.RetryBudgetPercent = 20
			if v := rb.GetBudgetPercent(); v != nil {
				c.CircuitBreakers.RetryBudgetPercent = v.GetValue()
			}
			if v := rb.GetMinRetryConcurrency(); v != nil {
				c.CircuitBreakers.MinRetryConcurrency = int(v.GetValue())
			}
		}
	}
	if od := ec.GetOutlierDetection(); od != nil {
		o := &OutlierDetection{Consecutive5xx: 5, ConsecutiveGatewayFailure: 5, BaseEjectionTime: duration(od.GetBaseEjectionTime()), MaxEjectionPercent: 10,
			Interval: duration(od.GetInterval()), MaxEjectionTime: duration(od.GetMaxEjectionTime())}
		if v := od.GetConsecutive_5Xx(); v != nil {
			o.Consecutive5xx = int(v.GetValue())
		}
		if v := od.GetConsecutiveGatewayFailure(); v != nil {
			o.ConsecutiveGatewayFailure = int(v.GetValue())
		}
		// Envoy enforces consecutive 5xx by default and gateway failures
		// only when asked to.
		if v := od.GetEnforcingConsecutive_5Xx(); v != nil {
			n := int(v.GetValue())
			o.EnforcingConsecutive5xx = &n
		}
		if v := od.GetEnforcingConsecutiveGatewayFailure(); v != nil {
			o.EnforcingConsecutiveGatewayFailure = int(v.GetValue())
		}
		if v := od.GetMaxEjectionPercent(); v != nil {
			o.MaxEjectionPercent = int(v.GetValue())
		}
		// Unset wrappers keep Envoy's defaults: success rate enforced,
		// failure percentage counted only. Fields the proxy reads as 0 =
		// default are copied as they are.
		if v := od.GetEnforcingSuccessRate(); v != nil {
			n := int(v.GetValue())
			o.EnforcingSuccessRate = &n
		}
		o.SuccessRateMinimumHosts = int(od.GetSuccessRateMinimumHosts().GetValue())
		o.SuccessRateRequestVolume = int(od.GetSuccessRateRequestVolume().GetValue())
		o.SuccessRateStdevFactor = int(od.GetSuccessRateStdevFactor().GetValue())
		o.EnforcingFailurePercentage = int(od.GetEnforcingFailurePercentage().GetValue())
		if v := od.GetFailurePercentageThreshold(); v != nil {
			n := int(v.GetValue())
			o.FailurePercentageThreshold = &n
		}
		o.FailurePercentageMinimumHosts = int(od.GetFailurePercentageMinimumHosts().GetValue())
		o.FailurePercentageRequestVolume = int(od.GetFailurePercentageRequestVolume().GetValue())
		c.OutlierDetection = o
	}
	if po, ok := ec.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]; ok {
		var hpo upstreamhttpv3.HttpProtocolOptions
		if err := po.UnmarshalTo(&hpo); err != nil {
			return c, fmt.Errorf("typed_extension_protocol_options: %w", err)
		}
		c.HTTP2 = hpo.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil
	}
	switch hcs := ec.GetHealthChecks(); len(hcs) {
	case 0:
	case 1:
		hc := hcs[0]
		c.HealthCheck = &HealthCheck{Interval: duration(hc.GetInterval()), Timeout: duration(hc.GetTimeout()),
			UnhealthyThreshold: int(hc.GetUnhealthyThreshold().GetValue()), HealthyThreshold: int(hc.GetHealthyThreshold().GetValue())}
		switch {
		case hc.GetTcpHealthCheck() != nil:
			if tc := hc.GetTcpHealthCheck(); tc.GetSend() != nil || len(tc.GetReceive()) > 0 {
				return c, errors.New("health_checks: TCP send/receive payloads are not supported (the check is an mTLS handshake with the peer sidecar)")
			}
		case hc.GetHttpHealthCheck() != nil:
			h := hc.GetHttpHealthCheck()
			if len(h.GetRequestHeadersToAdd()) > 0 || h.GetSend() != nil || len(h.GetReceive()) > 0 || h.GetMethod() != corev3.RequestMethod_METHOD_UNSPECIFIED && h.GetMethod() != corev3.RequestMethod_GET {
				return c, errors.New("health_checks: http: only path, host and expected_statuses are supported (a GET)")
			}
			c.HealthCheck.HTTPPath, c.HealthCheck.HTTPHost = h.GetPath(), h.GetHost()
			for _, r := range h.GetExpectedStatuses() {
				c.HealthCheck.ExpectedStatuses = append(c.HealthCheck.ExpectedStatuses, StatusRange{Start: int(r.GetStart()), End: int(r.GetEnd())})
			}
		case hc.GetGrpcHealthCheck() != nil:
			c.HealthCheck.GRPC, c.HealthCheck.GRPCService = true, hc.GetGrpcHealthCheck().GetServiceName()
		default:
			return c, errors.New("health_checks: only TCP, HTTP and gRPC checks are supported")
		}
	default:
		return c, errors.New("health_checks: at most one is supported")
	}
	ts := ec.GetTransportSocket()
	if ts == nil {
		return c, errors.New("no transport_socket: sidecar traffic must be mTLS")
	}
	var utc tlsv3.UpstreamTlsContext
	if err := ts.GetTypedConfig().UnmarshalTo(&utc); err != nil {
		return c, fmt.Errorf("transport_socket: want an UpstreamTlsContext: %w", err)
	}
	vc := utc.GetCommonTlsContext().GetValidationContext()
	if vc == nil {
		vc = utc.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext()
	}
	for _, san := range vc.GetMatchTypedSubjectAltNames() {
		if san.GetSanType() != tlsv3.SubjectAltNameMatcher_URI || san.GetMatcher().GetExact() == "" {
			return c, errors.New("match_typed_subject_alt_names: only exact URI SANs (SPIFFE IDs) are supported")
		}
		c.PeerIDs = append(c.PeerIDs, san.GetMatcher().GetExact())
	}
	if len(c.PeerIDs) == 0 {
		return c, errors.New("no match_typed_subject_alt_names: the peers' SPIFFE IDs must be named")
	}
	la := ec.GetLoadAssignment()
	if la == nil {
		la = las[ec.GetName()]
		if la == nil && ec.GetEdsClusterConfig().GetServiceName() != "" {
			la = las[ec.GetEdsClusterConfig().GetServiceName()]
		}
	}
	for _, lle := range la.GetEndpoints() {
		for _, lb := range lle.GetLbEndpoints() {
			// As in Envoy: UNKNOWN, HEALTHY and DEGRADED endpoints take
			// traffic; writd marks a workload that has not yet taken its
			// own configuration UNHEALTHY.
			switch lb.GetHealthStatus() {
			case corev3.HealthStatus_UNKNOWN, corev3.HealthStatus_HEALTHY, corev3.HealthStatus_DEGRADED:
			default:
				continue
			}
			sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
			if sa == nil || sa.GetPortValue() == 0 {
				return c, errors.New("endpoint: only socket addresses with a port are supported")
			}
			c.Endpoints = append(c.Endpoints, Endpoint{Address: net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))})
		}
	}
	return c, nil
}

func duration(d *durationpb.Duration) Duration {
	if d == nil {
		return 0
	}
	return Duration(d.AsDuration().Round(time.Microsecond))
}

func percent(p *typev3.FractionalPercent) float64 {
	if p == nil {
		return 0
	}
	n := float64(p.GetNumerator())
	switch p.GetDenominator() {
	case typev3.FractionalPercent_TEN_THOUSAND:
		return n / 100
	case typev3.FractionalPercent_MILLION:
		return n / 10000
	}
	return n
}

// Listeners is what ListenersFromEnvoy makes of Envoy listeners.
type Listeners struct {
	Inbound  []Inbound
	Outbound []Outbound
	// AppClusters are the clusters inbound listeners forward to: the
	// local application, not peer sidecars, so they are not Clusters.
	AppClusters map[string]bool
}

// ListenersFromEnvoy translates the listeners writd serves a sidecar:
// inbound ones (mTLS required, an HTTP connection manager whose inline
// route sends everything to a static cluster of the local app, ext_authz
// failing closed) and outbound ones (plaintext, an HTTP connection
// manager with RDS, or a TCP proxy to a cluster). cs holds the clusters
// the inbound listeners' apps are looked up in; service names the local
// service for policy.
func ListenersFromEnvoy(ls []*listenerv3.Listener, cs []*clusterv3.Cluster, service string) (Listeners, error) {
	out := Listeners{AppClusters: map[string]bool{}}
	byName := map[string]*clusterv3.Cluster{}
	for _, c := range cs {
		byName[c.GetName()] = c
	}
	var errs []error
	for _, l := range ls {
		if err := listenerFromEnvoy(l, byName, service, &out); err != nil {
			errs = append(errs, fmt.Errorf("listener %q: %w", l.GetName(), err))
		}
	}
	return out, errors.Join(errs...)
}

func listenerFromEnvoy(l *listenerv3.Listener, cs map[string]*clusterv3.Cluster, service string, out *Listeners) error {
	if err := l.Validate(); err != nil {
		return err
	}
	if l.GetApiListener() != nil {
		return errors.New("api_listener: that form is for proxyless gRPC clients")
	}
	sa := l.GetAddress().GetSocketAddress()
	if sa == nil || sa.GetPortValue() == 0 {
		return errors.New("address: only socket addresses with a port are supported")
	}
	addr := net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))
	if len(l.GetListenerFilters()) > 0 || l.GetUseOriginalDst().GetValue() {
		return errors.New("listener_filters and use_original_dst are not supported")
	}
	if len(l.GetFilterChains()) != 1 || l.GetDefaultFilterChain() != nil {
		return errors.New("exactly one filter chain is supported")
	}
	fc := l.GetFilterChains()[0]
	if fc.GetFilterChainMatch() != nil {
		return errors.New("filter_chain_match is not supported")
	}
	if len(fc.GetFilters()) != 1 {
		return errors.New("exactly one network filter is supported")
	}
	f := fc.GetFilters()[0]
	var tlsCtx *tlsv3.DownstreamTlsContext
	if ts := fc.GetTransportSocket(); ts != nil {
		tlsCtx = &tlsv3.DownstreamTlsContext{}
		if err := ts.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
			return fmt.Errorf("transport_socket: want a DownstreamTlsContext: %w", err)
		}
		if !tlsCtx.GetRequireClientCertificate().GetValue() {
			return errors.New("transport_socket: require_client_certificate must be set: mesh ports are mTLS only")
		}
	}
	switch f.GetName() {
	case wellknown.HTTPConnectionManager:
		var h hcmv3.HttpConnectionManager
		if err := f.GetTypedConfig().UnmarshalTo(&h); err != nil {
			return fmt.Errorf("http_connection_manager: %w", err)
		}
		if tlsCtx != nil {
			in, app, err := inboundFromEnvoy(l.GetName(), addr, &h, cs, service)
			if err != nil {
				return err
			}
			out.Inbound = append(out.Inbound, in)
			out.AppClusters[app] = true
			return nil
		}
		for _, hf := range h.GetHttpFilters() {
			if n := hf.GetName(); n != wellknown.Fault && n != wellknown.Router {
				return fmt.Errorf("http filter %q is not supported on outbound listeners", n)
			}
		}
		rds := h.GetRds()
		if rds == nil {
			return errors.New("outbound listeners need RDS (route_config_name)")
		}
		out.Outbound = append(out.Outbound, Outbound{Name: l.GetName(), Address: addr, Protocol: "http", Route: rds.GetRouteConfigName()})
	case wellknown.TCPProxy:
		if tlsCtx != nil {
			return errors.New("tcp_proxy behind TLS: inbound TCP is served by the inbound HTTP listener's ALPN")
		}
		var tp tcpproxyv3.TcpProxy
		if err := f.GetTypedConfig().UnmarshalTo(&tp); err != nil {
			return fmt.Errorf("tcp_proxy: %w", err)
		}
		if tp.GetCluster() == "" {
			return errors.New("tcp_proxy: only a single cluster is supported")
		}
		out.Outbound = append(out.Outbound, Outbound{Name: l.GetName(), Address: addr, Protocol: "tcp", Cluster: tp.GetCluster()})
	default:
		return fmt.Errorf("network filter %q is not supported", f.GetName())
	}
	return nil
}

// authzPerRoute reads the ext_authz per-route settings writd sets on an
// inbound route: the AuthorizationPolicies' mode, decision and dry-run
// decisions as context extensions. Disabling the check is refused: every inbound request is
// authorized.
func authzPerRoute(a *anypb.Any) (mode, decision, dryRun string, err error) {
	if a == nil {
		return "", "", "", nil
	}
	var pr extauthzv3.ExtAuthzPerRoute
	if err := a.UnmarshalTo(&pr); err != nil {
		return "", "", "", fmt.Errorf("ext_authz per-route config: %w", err)
	}
	if pr.GetDisabled() {
		return "", "", "", errors.New("ext_authz disabled on an inbound route: every inbound request must be authorized")
	}
	if cs := pr.GetCheckSettings(); cs.GetWithRequestBody() != nil || cs.GetDisableRequestBodyBuffering() {
		// writd sets the body on the filter; a route's override would be
		// silently ignored here, so it is refused.
		return "", "", "", errors.New("ext_authz per-route request body settings are not supported: set with_request_body on the filter")
	}
	ext := pr.GetCheckSettings().GetContextExtensions()
	return ext[enforcer.ModeContextKey], ext[enforcer.DecisionContextKey], ext[enforcer.DryRunContextKey], nil
}

// inboundFromEnvoy reads an inbound listener's HTTP connection manager:
// every route goes to one static cluster, the local app.
func inboundFromEnvoy(name, addr string, h *hcmv3.HttpConnectionManager, cs map[string]*clusterv3.Cluster, service string) (Inbound, string, error) {
	in := Inbound{Name: name, Address: addr, Service: service}
	authz := false
	for _, hf := range h.GetHttpFilters() {
		switch hf.GetName() {
		case wellknown.HTTPExternalAuthorization:
			var az extauthzv3.ExtAuthz
			if err := hf.GetTypedConfig().UnmarshalTo(&az); err != nil {
				return in, "", fmt.Errorf("ext_authz: %w", err)
			}
			if az.GetFailureModeAllow() {
				return in, "", errors.New("ext_authz: failure_mode_allow is refused: authorization fails closed")
			}
			if b := az.GetWithRequestBody(); b != nil {
				// Bounded by Config.Validate, which NACKs a larger one.
				in.RequestBody = RequestBody{MaxBytes: int(min(b.GetMaxRequestBytes(), math.MaxInt32)),
					AllowPartialMessage: b.GetAllowPartialMessage(), PackAsBytes: b.GetPackAsBytes()}
			}
			authz = true
		case wellknown.Router:
		default:
			return in, "", fmt.Errorf("http filter %q is not supported on inbound listeners", hf.GetName())
		}
	}
	// The data plane decides every request in-process; a listener that
	// asks for no authorization is not what writd sends, so refuse it
	// rather than enforce something the control plane did not mean.
	if !authz {
		return in, "", errors.New("inbound listener without ext_authz: every inbound request must be authorized")
	}
	rc := h.GetRouteConfig()
	if rc == nil {
		return in, "", errors.New("inbound listeners need an inline route_config to the local app")
	}
	app := ""
	first := true
	for _, vh := range rc.GetVirtualHosts() {
		for _, r := range vh.GetRoutes() {
			c := r.GetRoute().GetCluster()
			if c == "" || (app != "" && c != app) {
				return in, "", errors.New("route_config: every inbound route must go to the one local app cluster")
			}
			app = c
			mode, decision, dryRun, err := authzPerRoute(r.GetTypedPerFilterConfig()[wellknown.HTTPExternalAuthorization])
			if err == nil && mode == "" && decision == "" && dryRun == "" {
				mode, decision, dryRun, err = authzPerRoute(vh.GetTypedPerFilterConfig()[wellknown.HTTPExternalAuthorization])
			}
			if err != nil {
				return in, "", fmt.Errorf("route_config: %w", err)
			}
			if !first && (mode != in.AuthzMode || decision != in.AuthzDecision || dryRun != in.AuthzDryRun) {
				return in, "", errors.New("route_config: inbound routes with different authorization modes or decisions are not supported")
			}
			in.AuthzMode, in.AuthzDecision, in.AuthzDryRun, first = mode, decision, dryRun, false
		}
	}
	if app == "" {
		return in, "", errors.New("route_config: no route to the local app")
	}
	c := cs[app]
	if c == nil {
		return in, "", fmt.Errorf("app cluster %q: not among the clusters", app)
	}
	if c.GetType() != clusterv3.Cluster_STATIC {
		return in, "", fmt.Errorf("app cluster %q: must be STATIC", app)
	}
	var eps []*endpointv3.LbEndpoint
	for _, lle := range c.GetLoadAssignment().GetEndpoints() {
		eps = append(eps, lle.GetLbEndpoints()...)
	}
	sa := func() *corev3.SocketAddress {
		if len(eps) != 1 {
			return nil
		}
		return eps[0].GetEndpoint().GetAddress().GetSocketAddress()
	}()
	if sa == nil || sa.GetPortValue() == 0 {
		return in, "", fmt.Errorf("app cluster %q: want exactly one socket address endpoint", app)
	}
	in.App = net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))
	if _, ok := c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]; ok {
		in.AppProtocol = "h2c"
	}
	return in, app, nil
}
