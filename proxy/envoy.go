package proxy

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/durationpb"
)

// This file is the translation the xDS client will use: Envoy route
// configurations, clusters and load assignments into the parts of a
// Config they determine. What Writ's data plane does not implement is an
// error naming the field, so that the client NACKs it instead of silently
// routing differently from what writd meant. Listeners are translated
// with the xDS client, once writd's listener conventions are settled.

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
	switch {
	case m.GetPrefix() != "" || m.GetPathSpecifier() == nil:
		r.Prefix = m.GetPrefix()
		if r.Prefix == "" {
			r.Prefix = "/"
		}
	default:
		return r, errors.New("match: only prefix matches are supported")
	}
	if m.GetCaseSensitive() != nil && !m.GetCaseSensitive().GetValue() {
		return r, errors.New("match: case-insensitive matching is not supported")
	}
	if len(m.GetQueryParameters()) > 0 || len(m.GetCookies()) > 0 || m.GetRuntimeFraction() != nil || m.GetGrpc() != nil || m.GetTlsContext() != nil || len(m.GetDynamicMetadata()) > 0 {
		return r, errors.New("match: only prefix and header matches are supported")
	}
	for _, hm := range m.GetHeaders() {
		h := HeaderMatch{Name: hm.GetName(), Invert: hm.GetInvertMatch()}
		switch {
		case hm.GetPresentMatch():
		case hm.GetStringMatch().GetExact() != "":
			h.Exact = hm.GetStringMatch().GetExact()
		case hm.GetStringMatch().GetPrefix() != "":
			h.Prefix = hm.GetStringMatch().GetPrefix()
		default:
			return r, fmt.Errorf("match: header %q: only present, exact and prefix matches are supported", hm.GetName())
		}
		if hm.GetStringMatch().GetIgnoreCase() {
			return r, fmt.Errorf("match: header %q: ignore_case is not supported", hm.GetName())
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
	default:
		return r, errors.New("action: hash_policy: only one header hash policy is supported")
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
			case "5xx", "gateway-error", "connect-failure", "reset":
				p.RetryOn = append(p.RetryOn, on)
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
			if ab.GetHttpStatus() == 0 {
				return r, errors.New("fault: only http_status aborts are supported")
			}
			fault.AbortStatus, fault.AbortPercent = int(ab.GetHttpStatus()), percent(ab.GetPercentage())
		}
		r.Fault = fault
	}
	return r, nil
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
		c.OutlierDetection = &OutlierDetection{Consecutive5xx: 5, BaseEjectionTime: duration(od.GetBaseEjectionTime()), MaxEjectionPercent: 10}
		if v := od.GetConsecutive_5Xx(); v != nil {
			c.OutlierDetection.Consecutive5xx = int(v.GetValue())
		}
		if v := od.GetMaxEjectionPercent(); v != nil {
			c.OutlierDetection.MaxEjectionPercent = int(v.GetValue())
		}
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
