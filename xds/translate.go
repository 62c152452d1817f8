// Package xds turns Writ's mesh configuration and service registry into
// Envoy v3 resources and serves them over ADS (state of the world) and SDS
// with go-control-plane, to Envoy, Writ's sidecar and proxyless gRPC
// clients alike. It also keeps the mesh configuration's history and the
// registry in PostgreSQL (Store).
//
// It imports config (and store's pool); cmd/writd wires it in.
package xds

import (
	"cmp"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultcommonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/fault/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/writmesh/writ/config"
)

// Flavor is the kind of data plane a node is; it decides how TLS and
// authorization are expressed.
type Flavor string

// Data-plane flavors, named by the WRIT_PROXY node metadata key.
const (
	// FlavorGRPC is a proxyless grpc-go application: TLS from certificate
	// provider instances (file_watcher), authorization through RBAC, the
	// ApiListener form for clients and template-named server listeners.
	FlavorGRPC Flavor = "grpc"
	// FlavorEnvoy is Envoy or Writ's sidecar: TLS over SDS, ext_authz to
	// the local enforcer.
	FlavorEnvoy Flavor = "envoy"
)

// Names shared with the data planes' bootstrap.
const (
	// CertProviderInstance is the certificate provider instance a gRPC
	// bootstrap must define (file_watcher fed with the workload's SVID).
	CertProviderInstance = "writ"
	// ServerListenerPrefix is the start of the gRPC server listener
	// template: a bootstrap sets server_listener_resource_name_template to
	// ServerListenerPrefix + "%s".
	ServerListenerPrefix = "writ/inbound/"
	// IdentitySecret and RootSecret are the SDS secret names for Envoy: the
	// identity comes from the local agent's SDS (its key never leaves the
	// node), the trust bundle from writd.
	IdentitySecret = "default"
	RootSecret     = "ROOTCA"
	// AgentSDSCluster and EnforcerCluster are static clusters an Envoy
	// bootstrap defines: the local agent's SDS socket and the local
	// enforcer (ext_authz).
	AgentSDSCluster = "writ-agent-sds"
	EnforcerCluster = "writ-enforcer"
)

// Node is what writd knows of an xDS client: its authenticated identity and
// what its metadata claims (checked against the identity by the server).
type Node struct {
	ID        string
	SPIFFEID  string
	Namespace string
	Service   string // empty for a client that serves nothing
	Labels    map[string]string
	Address   string
	Ports     []int
	// AppPorts maps a mesh port to the port the local application listens
	// on (loopback) when they differ, as for a sidecar sharing the host's
	// network with its app; absent ports forward to the same port.
	AppPorts map[int]int
	Flavor   Flavor
}

// Mesh is the input of a translation: the configuration, the registry and
// the trust bundle. Treat it as read-only; it is shared between builds.
type Mesh struct {
	TrustDomain string
	Resources   []*config.Resource
	Endpoints   []Endpoint
	Bundle      []*x509.Certificate

	services map[string]*svcInfo // by "name.namespace"
}

type svcInfo struct {
	res    *config.Resource
	spec   *config.ServiceSpec
	route  *config.RouteSpec
	policy *config.TrafficPolicySpec
	authz  []*config.AuthorizationPolicySpec // sorted by namespace/name
}

func (m *Mesh) index() {
	if m.services != nil {
		return
	}
	m.services = map[string]*svcInfo{}
	for _, r := range m.Resources {
		if s, ok := r.Spec.(*config.ServiceSpec); ok {
			m.services[r.Ref()] = &svcInfo{res: r, spec: s}
		}
	}
	for _, r := range m.Resources {
		ns := r.Metadata.Namespace
		switch s := r.Spec.(type) {
		case *config.RouteSpec:
			if si := m.services[config.ServiceRef(s.Service, ns)]; si != nil {
				si.route = s
			}
		case *config.TrafficPolicySpec:
			if si := m.services[config.ServiceRef(s.Service, ns)]; si != nil {
				si.policy = s
			}
		case *config.AuthorizationPolicySpec:
			if si := m.services[config.ServiceRef(s.Service, ns)]; si != nil {
				si.authz = append(si.authz, s)
			}
		}
	}
}

// Resources is one node's configuration by type URL.
type Resources map[resource.Type][]types.Resource

// ClusterName names the cluster of a service port and subset ("" for all
// of the service's endpoints).
func ClusterName(svc string, port int, subset string) string {
	return fmt.Sprintf("outbound|%d|%s|%s", port, subset, svc)
}

// Build translates the mesh for one node. Every resource it returns
// passes its Validate().
func Build(m *Mesh, n Node) (Resources, error) {
	m.index()
	out := Resources{}
	add := func(t resource.Type, r types.Resource) { out[t] = append(out[t], r) }
	refs := slices.Sorted(maps.Keys(m.services))
	portRoutes := map[int]*routev3.RouteConfiguration{}
	for _, ref := range refs {
		si := m.services[ref]
		for i, p := range si.spec.Ports {
			for _, c := range buildClusters(m, si, ref, p, n) {
				add(resource.ClusterType, c)
				add(resource.EndpointType, buildCLA(m, si, ref, p, c.Name))
			}
			if p.Protocol == config.ProtocolTCP {
				if n.Flavor == FlavorEnvoy {
					l, err := tcpListener(ref, p)
					if err != nil {
						return nil, err
					}
					add(resource.ListenerType, l)
				}
				continue
			}
			rc := buildRouteConfig(si, ref, p, i == 0)
			if n.Flavor == FlavorEnvoy {
				// Envoy's outbound listener on this port serves every
				// service on it: one virtual host each.
				prc := portRoutes[p.Port]
				if prc == nil {
					prc = &routev3.RouteConfiguration{Name: fmt.Sprintf("outbound|%d", p.Port)}
					portRoutes[p.Port] = prc
					add(resource.RouteType, prc)
				}
				vh := proto.Clone(rc.VirtualHosts[0]).(*routev3.VirtualHost)
				name, _, _ := strings.Cut(ref, ".")
				vh.Domains = []string{name, ref, fmt.Sprintf("%s:%d", ref, p.Port)}
				prc.VirtualHosts = append(prc.VirtualHosts, vh)
			} else {
				add(resource.RouteType, rc)
			}
			if n.Flavor == FlavorGRPC {
				names := []string{fmt.Sprintf("%s:%d", ref, p.Port)}
				if i == 0 {
					names = append(names, ref)
				}
				for _, name := range names {
					l, err := apiListener(name, rc.Name)
					if err != nil {
						return nil, err
					}
					add(resource.ListenerType, l)
				}
			}
		}
	}
	if n.Flavor == FlavorEnvoy {
		ls, err := envoyOutbound(m, refs)
		if err != nil {
			return nil, err
		}
		for _, l := range ls {
			add(resource.ListenerType, l)
		}
		if s := rootSecret(m); s != nil {
			add(resource.SecretType, s)
		}
	}
	if n.Service != "" {
		si := m.services[config.ServiceRef(n.Service, n.Namespace)]
		if si != nil {
			ls, err := inboundListeners(m, si, n)
			if err != nil {
				return nil, err
			}
			for _, l := range ls {
				add(resource.ListenerType, l)
			}
			if n.Flavor == FlavorEnvoy {
				for _, port := range n.Ports {
					add(resource.ClusterType, localCluster(port, n.AppPorts[port]))
				}
			}
		}
	}
	for t, rs := range out {
		for _, r := range rs {
			if v, ok := r.(interface{ Validate() error }); ok {
				if err := v.Validate(); err != nil {
					return nil, fmt.Errorf("generated %s %q is invalid: %w", t, resourceName(r), err)
				}
			}
		}
	}
	return out, nil
}

func resourceName(r types.Resource) string { return cacheName(r) }

func cacheName(r types.Resource) string { return cachev3.GetResourceName(r) }

// Version is a digest of a node's resources: equal content, equal version,
// so a rebuild that changes nothing for a node pushes nothing to it.
func (rs Resources) Version() string {
	h := sha256.New()
	opts := proto.MarshalOptions{Deterministic: true}
	for _, t := range slices.Sorted(maps.Keys(rs)) {
		list := slices.Clone(rs[t])
		sort.Slice(list, func(i, j int) bool { return cacheName(list[i]) < cacheName(list[j]) })
		h.Write([]byte(t))
		for _, r := range list {
			b, _ := opts.Marshal(r)
			h.Write([]byte(strconv.Itoa(len(b))))
			h.Write(b)
		}
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// mustAny packs m deterministically: an Any holds bytes, and map fields
// (context extensions) would otherwise marshal in random order and make
// Version differ for equal content.
func mustAny(m proto.Message) *anypb.Any {
	a := &anypb.Any{}
	err := anypb.MarshalFrom(a, m, proto.MarshalOptions{Deterministic: true})
	if err != nil {
		panic(fmt.Sprintf("xds: marshal %T: %v", m, err)) // only on a programming error
	}
	return a
}

func ads() *corev3.ConfigSource {
	return &corev3.ConfigSource{ResourceApiVersion: corev3.ApiVersion_V3, ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}
}

func dur(d config.Duration) *durationpb.Duration { return durationpb.New(time.Duration(d)) }

func percent(p float64) *typev3.FractionalPercent {
	// Millionths keep fractional percentages such as 0.5 %.
	return &typev3.FractionalPercent{Numerator: uint32(p * 10000), Denominator: typev3.FractionalPercent_MILLION}
}

func serviceSAN(td, ref string) string {
	name, ns, _ := strings.Cut(ref, ".")
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, ns, name)
}

// buildClusters makes the cluster of the whole service port and one per
// subset.
func buildClusters(m *Mesh, si *svcInfo, ref string, p config.ServicePort, n Node) []*clusterv3.Cluster {
	subsets := []string{""}
	for _, ss := range si.spec.Subsets {
		subsets = append(subsets, ss.Name)
	}
	var out []*clusterv3.Cluster
	for _, sub := range subsets {
		name := ClusterName(ref, p.Port, sub)
		c := &clusterv3.Cluster{
			Name:                 name,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: ads(), ServiceName: name},
			ConnectTimeout:       durationpb.New(5 * time.Second),
			LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
			TransportSocket:      upstreamTLS(m.TrustDomain, ref, n.Flavor),
		}
		if p.Protocol == config.ProtocolGRPC || p.Protocol == config.ProtocolHTTP2 {
			c.TypedExtensionProtocolOptions = http2Options()
		}
		if tp := si.policy; tp != nil {
			applyPolicy(c, tp, p)
		}
		out = append(out, c)
	}
	return out
}

func applyPolicy(c *clusterv3.Cluster, tp *config.TrafficPolicySpec, p config.ServicePort) {
	if lb := tp.LoadBalancer; lb != nil {
		switch lb.Policy {
		case config.LBLeastRequest:
			c.LbPolicy = clusterv3.Cluster_LEAST_REQUEST
		case config.LBRingHash:
			c.LbPolicy = clusterv3.Cluster_RING_HASH
		}
	}
	th := &clusterv3.CircuitBreakers_Thresholds{Priority: corev3.RoutingPriority_DEFAULT}
	set := false
	if cp := tp.ConnectionPool; cp != nil {
		u32 := func(v int) *wrapperspb.UInt32Value {
			if v <= 0 {
				return nil
			}
			set = true
			return wrapperspb.UInt32(uint32(v))
		}
		th.MaxConnections, th.MaxPendingRequests, th.MaxRequests, th.MaxRetries = u32(cp.MaxConnections), u32(cp.MaxPendingRequests), u32(cp.MaxRequests), u32(cp.MaxRetries)
	}
	if rb := tp.RetryBudget; rb != nil {
		set = true
		th.RetryBudget = &clusterv3.CircuitBreakers_Thresholds_RetryBudget{BudgetPercent: &typev3.Percent{Value: rb.Percent}}
		if rb.MinRetryConcurrency > 0 {
			th.RetryBudget.MinRetryConcurrency = wrapperspb.UInt32(uint32(rb.MinRetryConcurrency))
		}
	}
	if set {
		c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{th}}
	}
	if od := tp.OutlierDetection; od != nil {
		o := &clusterv3.OutlierDetection{}
		// Envoy enforces consecutive 5xx unless told not to (its count
		// defaults to 5) and gateway failures only when told to.
		if od.Consecutive5xx > 0 {
			o.Consecutive_5Xx = wrapperspb.UInt32(uint32(od.Consecutive5xx))
		} else {
			o.EnforcingConsecutive_5Xx = wrapperspb.UInt32(0)
		}
		if od.ConsecutiveGatewayFailure > 0 {
			o.ConsecutiveGatewayFailure = wrapperspb.UInt32(uint32(od.ConsecutiveGatewayFailure))
			o.EnforcingConsecutiveGatewayFailure = wrapperspb.UInt32(100)
		}
		if od.MaxEjectionTime > 0 {
			o.MaxEjectionTime = dur(od.MaxEjectionTime)
		}
		if od.Interval > 0 {
			o.Interval = dur(od.Interval)
		}
		if od.BaseEjectionTime > 0 {
			o.BaseEjectionTime = dur(od.BaseEjectionTime)
		}
		if od.MaxEjectionPercent > 0 {
			o.MaxEjectionPercent = wrapperspb.UInt32(uint32(od.MaxEjectionPercent))
		}
		// Envoy enforces success rate unless told not to; the mesh
		// config turns each interval detector on explicitly.
		u32 := func(p *int) *wrapperspb.UInt32Value {
			if p == nil {
				return nil
			}
			return wrapperspb.UInt32(uint32(*p))
		}
		if od.SuccessRateOn() {
			o.EnforcingSuccessRate = u32(od.EnforcingSuccessRate)
			o.SuccessRateMinimumHosts = u32(od.SuccessRateMinimumHosts)
			o.SuccessRateRequestVolume = u32(od.SuccessRateRequestVolume)
			o.SuccessRateStdevFactor = u32(od.SuccessRateStdevFactor)
		} else {
			o.EnforcingSuccessRate = wrapperspb.UInt32(0)
		}
		if od.FailurePercentageOn() {
			o.EnforcingFailurePercentage = u32(od.EnforcingFailurePercentage)
			o.FailurePercentageThreshold = u32(od.FailurePercentageThreshold)
			o.FailurePercentageMinimumHosts = u32(od.FailurePercentageMinimumHosts)
			o.FailurePercentageRequestVolume = u32(od.FailurePercentageRequestVolume)
		}
		c.OutlierDetection = o
	}
	if hc := tp.HealthCheck; hc != nil {
		h := &corev3.HealthCheck{
			Timeout:            dur(hc.Timeout),
			Interval:           dur(hc.Interval),
			UnhealthyThreshold: wrapperspb.UInt32(uint32(max(hc.UnhealthyThreshold, 1))),
			HealthyThreshold:   wrapperspb.UInt32(uint32(max(hc.HealthyThreshold, 1))),
		}
		switch hc.Type {
		case "http":
			h.HealthChecker = &corev3.HealthCheck_HttpHealthCheck_{HttpHealthCheck: &corev3.HealthCheck_HttpHealthCheck{Path: hc.Path}}
		case "grpc":
			h.HealthChecker = &corev3.HealthCheck_GrpcHealthCheck_{GrpcHealthCheck: &corev3.HealthCheck_GrpcHealthCheck{ServiceName: hc.GRPCService}}
		default:
			h.HealthChecker = &corev3.HealthCheck_TcpHealthCheck_{TcpHealthCheck: &corev3.HealthCheck_TcpHealthCheck{}}
		}
		c.HealthChecks = []*corev3.HealthCheck{h}
	}
}

// http2Options keeps gRPC and HTTP/2 upstreams on HTTP/2.
func http2Options() map[string]*anypb.Any {
	return map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(&upstreamhttpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}},
	})}
}

// upstreamTLS is mTLS to the service's workloads, accepting only the
// service's SPIFFE ID.
func upstreamTLS(td, ref string, f Flavor) *corev3.TransportSocket {
	san := &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: serviceSAN(td, ref)}}
	var common *tlsv3.CommonTlsContext
	if f == FlavorGRPC {
		common = &tlsv3.CommonTlsContext{
			TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance, CertificateName: "default"},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance, CertificateName: "ROOTCA"},
				MatchSubjectAltNames:          []*matcherv3.StringMatcher{san},
			}},
		}
	} else {
		common = &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{agentSDS(IdentitySecret)},
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{SanType: tlsv3.SubjectAltNameMatcher_URI, Matcher: san}}},
				ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: RootSecret, SdsConfig: ads()},
			}},
		}
	}
	return &corev3.TransportSocket{Name: wellknown.TransportSocketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.UpstreamTlsContext{CommonTlsContext: common})}}
}

func agentSDS(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: &corev3.ConfigSource{
		ResourceApiVersion: corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
			ApiType:             corev3.ApiConfigSource_GRPC,
			TransportApiVersion: corev3.ApiVersion_V3,
			GrpcServices:        []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: AgentSDSCluster}}}},
		}},
	}}
}

// buildCLA lists the endpoints of one cluster: registered workloads of the
// service whose labels include the subset's, and matching static ones.
func buildCLA(m *Mesh, si *svcInfo, ref string, p config.ServicePort, cluster string) *endpointv3.ClusterLoadAssignment {
	subset := strings.Split(cluster, "|")[2]
	var want map[string]string
	for _, ss := range si.spec.Subsets {
		if ss.Name == subset {
			want = ss.Labels
		}
	}
	match := func(labels map[string]string) bool {
		for k, v := range want {
			if labels[k] != v {
				return false
			}
		}
		return true
	}
	var lbs []*endpointv3.LbEndpoint
	lb := func(addr string, port int, healthy bool) *endpointv3.LbEndpoint {
		// A registered workload that has not yet taken its own
		// configuration cannot serve: UNHEALTHY keeps Envoy and grpc-go
		// from sending it traffic.
		hs := corev3.HealthStatus_HEALTHY
		if !healthy {
			hs = corev3.HealthStatus_UNHEALTHY
		}
		return &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: sockAddr(addr, port)}}, HealthStatus: hs}
	}
	name, ns, _ := strings.Cut(ref, ".")
	for _, e := range m.Endpoints {
		if e.Service != name || e.Namespace != ns || !match(e.Labels) {
			continue
		}
		port := 0
		if slices.Contains(e.Ports, p.Port) {
			port = p.Port
		} else if len(e.Ports) == 1 {
			port = e.Ports[0]
		}
		if port == 0 {
			continue
		}
		lbs = append(lbs, lb(e.Address, port, e.Healthy))
	}
	for _, se := range si.spec.Endpoints {
		if match(se.Labels) {
			lbs = append(lbs, lb(se.Address, se.Port, true))
		}
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: cluster}
	if len(lbs) > 0 {
		cla.Endpoints = []*endpointv3.LocalityLbEndpoints{{LbEndpoints: lbs, LoadBalancingWeight: wrapperspb.UInt32(1), Locality: &corev3.Locality{}}}
	}
	return cla
}

func sockAddr(addr string, port int) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: addr, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(port)}}}}
}

// buildRouteConfig makes the route configuration of one service port.
func buildRouteConfig(si *svcInfo, ref string, p config.ServicePort, first bool) *routev3.RouteConfiguration {
	name := fmt.Sprintf("%s:%d", ref, p.Port)
	domains := []string{name}
	if first {
		domains = append(domains, ref)
	}
	vh := &routev3.VirtualHost{Name: name, Domains: domains}
	if si.route == nil {
		vh.Routes = []*routev3.Route{{
			Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: ClusterName(ref, p.Port, "")}, HashPolicy: hashPolicy(si)}},
		}}
	}
	ns := si.res.Metadata.Namespace
	for i, rule := range routeRules(si) {
		r := &routev3.Route{Name: fmt.Sprintf("%s/%d", name, i), Match: routeMatch(rule.Match)}
		if rule.Name != "" {
			r.Name = rule.Name
		}
		act := &routev3.RouteAction{HashPolicy: hashPolicy(si)}
		target := func(svc, subset string) string {
			full := ref
			if svc != "" {
				full = config.ServiceRef(svc, ns)
			}
			return ClusterName(full, p.Port, subset)
		}
		if len(rule.Destinations) == 1 {
			d := rule.Destinations[0]
			act.ClusterSpecifier = &routev3.RouteAction_Cluster{Cluster: target(d.Service, d.Subset)}
		} else {
			wc := &routev3.WeightedCluster{}
			for _, d := range rule.Destinations {
				if d.Weight == 0 {
					continue
				}
				wc.Clusters = append(wc.Clusters, &routev3.WeightedCluster_ClusterWeight{Name: target(d.Service, d.Subset), Weight: wrapperspb.UInt32(uint32(d.Weight))})
			}
			act.ClusterSpecifier = &routev3.RouteAction_WeightedClusters{WeightedClusters: wc}
		}
		if rule.Timeout > 0 {
			act.Timeout = dur(rule.Timeout)
			// grpc-go ignores timeout and honours max_stream_duration
			// (gRFC A31); Envoy applies the stricter of the two.
			act.MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: dur(rule.Timeout)}
		}
		if rt := rule.Retries; rt != nil && rt.Attempts > 0 {
			on := rt.On
			if len(on) == 0 {
				if p.Protocol == config.ProtocolGRPC {
					on = []string{"unavailable"}
				} else {
					on = []string{"connect-failure", "refused-stream", "gateway-error"}
				}
			}
			rp := &routev3.RetryPolicy{RetryOn: strings.Join(on, ","), NumRetries: wrapperspb.UInt32(uint32(rt.Attempts))}
			if rt.PerTryTimeout > 0 {
				rp.PerTryTimeout = dur(rt.PerTryTimeout)
			}
			act.RetryPolicy = rp
		}
		if mr := rule.Mirror; mr != nil {
			act.RequestMirrorPolicies = []*routev3.RouteAction_RequestMirrorPolicy{{
				Cluster:         target(mr.Service, mr.Subset),
				RuntimeFraction: &corev3.RuntimeFractionalPercent{DefaultValue: percent(mr.Percent)},
			}}
		}
		if ft := rule.Fault; ft != nil {
			r.TypedPerFilterConfig = map[string]*anypb.Any{wellknown.Fault: mustAny(faultConfig(ft))}
		}
		r.Action = &routev3.Route_Route{Route: act}
		vh.Routes = append(vh.Routes, r)
	}
	return &routev3.RouteConfiguration{Name: name, VirtualHosts: []*routev3.VirtualHost{vh}}
}

// hashPolicy is what ring_hash hashes on: a header or the source address.
func hashPolicy(si *svcInfo) []*routev3.RouteAction_HashPolicy {
	if si.policy == nil || si.policy.LoadBalancer == nil || si.policy.LoadBalancer.Policy != config.LBRingHash {
		return nil
	}
	if h := si.policy.LoadBalancer.HashHeader; h != "" {
		return []*routev3.RouteAction_HashPolicy{{PolicySpecifier: &routev3.RouteAction_HashPolicy_Header_{Header: &routev3.RouteAction_HashPolicy_Header{HeaderName: strings.ToLower(h)}}}}
	}
	return []*routev3.RouteAction_HashPolicy{{PolicySpecifier: &routev3.RouteAction_HashPolicy_ConnectionProperties_{ConnectionProperties: &routev3.RouteAction_HashPolicy_ConnectionProperties{SourceIp: true}}}}
}

func routeRules(si *svcInfo) []config.RouteRule {
	if si.route == nil {
		return nil
	}
	return si.route.Rules
}

func routeMatch(m *config.Match) *routev3.RouteMatch {
	rm := &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}
	if m == nil {
		return rm
	}
	switch {
	case m.PathExact != "":
		rm.PathSpecifier = &routev3.RouteMatch_Path{Path: m.PathExact}
	case m.PathRegex != "":
		rm.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: m.PathRegex}}
	case m.PathPrefix != "":
		rm.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: m.PathPrefix}
	}
	if m.Method != "" {
		rm.Headers = append(rm.Headers, &routev3.HeaderMatcher{Name: ":method", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: m.Method}}}})
	}
	for _, h := range m.Headers {
		hm := &routev3.HeaderMatcher{Name: strings.ToLower(h.Name)}
		switch {
		case h.Present:
			hm.HeaderMatchSpecifier = &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}
		case h.Exact != "":
			hm.HeaderMatchSpecifier = &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: h.Exact}}}
		case h.Prefix != "":
			hm.HeaderMatchSpecifier = &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: h.Prefix}}}
		case h.Regex != "":
			hm.HeaderMatchSpecifier = &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: h.Regex}}}}
		}
		rm.Headers = append(rm.Headers, hm)
	}
	return rm
}

func faultConfig(ft *config.Fault) *faultv3.HTTPFault {
	f := &faultv3.HTTPFault{}
	if d := ft.Delay; d != nil {
		f.Delay = &faultcommonv3.FaultDelay{FaultDelaySecifier: &faultcommonv3.FaultDelay_FixedDelay{FixedDelay: dur(d.Fixed)}, Percentage: percent(d.Percent)}
	}
	if a := ft.Abort; a != nil {
		f.Abort = &faultv3.FaultAbort{Percentage: percent(a.Percent)}
		if a.GRPCStatus != 0 {
			f.Abort.ErrorType = &faultv3.FaultAbort_GrpcStatus{GrpcStatus: uint32(a.GRPCStatus)}
		} else {
			f.Abort.ErrorType = &faultv3.FaultAbort_HttpStatus{HttpStatus: uint32(a.HTTPStatus)}
		}
	}
	return f
}

func httpFilter(name string, cfg proto.Message) *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: name, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(cfg)}}
}

// apiListener is the form grpc-go clients ask for by target name.
func apiListener(name, routeName string) (*listenerv3.Listener, error) {
	m := &hcmv3.HttpConnectionManager{
		StatPrefix:     name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{ConfigSource: ads(), RouteConfigName: routeName}},
		HttpFilters:    []*hcmv3.HttpFilter{httpFilter(wellknown.Fault, &faultv3.HTTPFault{}), httpFilter(wellknown.Router, &routerv3.Router{})},
	}
	return &listenerv3.Listener{Name: name, ApiListener: &listenerv3.ApiListener{ApiListener: mustAny(m)}}, nil
}

// inboundListeners serve the node's own ports: for gRPC servers the
// template-named listener with mTLS and RBAC, for Envoy an mTLS listener
// with ext_authz to the local enforcer.
func inboundListeners(m *Mesh, si *svcInfo, n Node) ([]*listenerv3.Listener, error) {
	var out []*listenerv3.Listener
	for _, port := range n.Ports {
		addr := netip.AddrPortFrom(netip.MustParseAddr(normalizeAddr(n.Address)), uint16(port)).String()
		if n.Flavor == FlavorGRPC {
			out = append(out, grpcServerListener(m, si, n, ServerListenerPrefix+addr, port))
		} else {
			out = append(out, envoyInbound(si, n, "inbound|"+addr, port))
		}
	}
	return out, nil
}

func normalizeAddr(a string) string {
	if _, err := netip.ParseAddr(a); err != nil {
		return "0.0.0.0"
	}
	return a
}

func downstreamTLS(f Flavor) *corev3.TransportSocket {
	var common *tlsv3.CommonTlsContext
	if f == FlavorGRPC {
		common = &tlsv3.CommonTlsContext{
			TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance, CertificateName: "default"},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance, CertificateName: "ROOTCA"},
			}},
		}
	} else {
		common = &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{agentSDS(IdentitySecret)},
			ValidationContextType:          &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: RootSecret, SdsConfig: ads()}},
		}
	}
	return &corev3.TransportSocket{Name: wellknown.TransportSocketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.DownstreamTlsContext{
		CommonTlsContext: common, RequireClientCertificate: wrapperspb.Bool(true)})}}
}

// rbacFor expresses a service's AuthorizationPolicies as RBAC: a request
// is allowed when an allow rule of any enforced policy matches it. Default
// deny: with no enforced policy nothing is allowed. A policy without an
// allow list is Rego only, which RBAC cannot express: if an enforced one
// exists, no RBAC filter is generated and the server must evaluate the
// policies in-process (the enforcer's gRPC interceptor). Dry-run policies'
// allow lists become shadow rules: evaluated and reported, never enforced.
func rbacFor(td string, policies []*config.AuthorizationPolicySpec) *rbacfilterv3.RBAC {
	rules := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{}}
	var shadow *rbacv3.RBAC
	for pi, a := range policies {
		target := rules
		if a.Mode == config.ModeDryRun {
			if shadow == nil {
				shadow = &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{}}
			}
			target = shadow
		} else if len(a.Allow) == 0 {
			return nil
		}
		for i, al := range a.Allow {
			target.Policies[fmt.Sprintf("policy-%d-allow-%d", pi, i)] = allowPolicy(td, al)
		}
	}
	return &rbacfilterv3.RBAC{Rules: rules, ShadowRules: shadow}
}

func allowPolicy(td string, al config.AllowRule) *rbacv3.Policy {
	anyPeer := &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://" + td + "/"}}}}}
	pol := &rbacv3.Policy{}
	var ids []*rbacv3.Principal
	for _, p := range al.Principals {
		if p == "*" {
			ids = append(ids, anyPeer)
			continue
		}
		ids = append(ids, &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: p}}}}})
	}
	if len(ids) == 0 {
		ids = []*rbacv3.Principal{anyPeer}
	}
	pol.Principals = []*rbacv3.Principal{{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: ids}}}}
	var perms []*rbacv3.Permission
	for _, path := range al.Paths {
		sm := &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: path}}
		if strings.HasSuffix(path, "*") {
			sm.MatchPattern = &matcherv3.StringMatcher_Prefix{Prefix: strings.TrimSuffix(path, "*")}
		}
		perms = append(perms, &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: sm}}}})
	}
	var methods []*rbacv3.Permission
	for _, m := range al.Methods {
		methods = append(methods, &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: ":method", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: m}}}}}})
	}
	var and []*rbacv3.Permission
	if len(perms) > 0 {
		and = append(and, &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: perms}}})
	}
	if len(methods) > 0 {
		and = append(and, &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: methods}}})
	}
	if len(and) == 0 {
		pol.Permissions = []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}}
	} else {
		pol.Permissions = []*rbacv3.Permission{{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: and}}}}
	}
	return pol
}

func grpcServerListener(m *Mesh, si *svcInfo, n Node, name string, port int) *listenerv3.Listener {
	filters := []*hcmv3.HttpFilter{}
	if rb := rbacFor(m.TrustDomain, si.authz); rb != nil {
		filters = append(filters, httpFilter(wellknown.HTTPRoleBasedAccessControl, rb))
	}
	filters = append(filters, httpFilter(wellknown.Router, &routerv3.Router{}))
	h := &hcmv3.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: "inbound",
			VirtualHosts: []*routev3.VirtualHost{{Name: "inbound", Domains: []string{"*"}, Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_NonForwardingAction{NonForwardingAction: &routev3.NonForwardingAction{}},
			}}}},
		}},
		HttpFilters: filters,
	}
	return &listenerv3.Listener{
		Name:    name,
		Address: sockAddr(normalizeAddr(n.Address), port),
		FilterChains: []*listenerv3.FilterChain{{
			Name:            "inbound-mtls",
			Filters:         []*listenerv3.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(h)}}},
			TransportSocket: downstreamTLS(FlavorGRPC),
		}},
	}
}

// Context extensions of the inbound ext_authz check, from the
// AuthorizationPolicies bound to the service.
const (
	// AuthzModeContextKey is "enforce" when an enforced policy is bound,
	// "dry-run" when only dry-run ones are (evaluate and record, never
	// deny).
	AuthzModeContextKey = "writ.authz_mode"
	// AuthzDecisionContextKey is the Rego query deciding, data.PACKAGE.
	// DECISION, of the enforced policies (of the dry-run ones when none
	// is enforced); several are joined with ",".
	AuthzDecisionContextKey = "writ.authz_decision"
	// AuthzDryRunContextKey is the queries of the dry-run policies bound
	// beside enforced ones, joined with ",": evaluated and recorded on
	// every request, never enforced. Absent when none is, or when only
	// dry-run policies are bound (they are then the decision).
	AuthzDryRunContextKey = "writ.authz_dry_run"
)

// authzContext is the inbound check's context extensions for policies
// (sorted), nil when none is bound: the ext_authz server's own policy
// then decides, enforced.
func authzContext(policies []*config.AuthorizationPolicySpec) map[string]string {
	if len(policies) == 0 {
		return nil
	}
	var enforced, dry []string
	for _, a := range policies {
		d := "data." + a.Package + "." + cmp.Or(a.Decision, "allow")
		if a.Mode == config.ModeDryRun {
			dry = append(dry, d)
		} else {
			enforced = append(enforced, d)
		}
	}
	join := func(ds []string) string {
		slices.Sort(ds)
		return strings.Join(slices.Compact(ds), ",")
	}
	if len(enforced) == 0 {
		return map[string]string{AuthzModeContextKey: config.ModeDryRun, AuthzDecisionContextKey: join(dry)}
	}
	ext := map[string]string{AuthzModeContextKey: config.ModeEnforce, AuthzDecisionContextKey: join(enforced)}
	// A query enforced already needs no dry run of itself.
	dry = slices.DeleteFunc(dry, func(d string) bool { return slices.Contains(enforced, d) })
	if len(dry) > 0 {
		ext[AuthzDryRunContextKey] = join(dry)
	}
	return ext
}

// requestBody is the ext_authz with_request_body of the policies bound to
// a service, nil when none asks for the body (nothing is buffered): the
// largest max_request_bytes, partial messages only if every policy that
// asks allows them (one that does not gets the whole body or a 413), and
// bytes if any asks (a gRPC body is not a valid string).
func requestBody(policies []*config.AuthorizationPolicySpec) *extauthzv3.BufferSettings {
	var bs *extauthzv3.BufferSettings
	for _, a := range policies {
		b := a.RequestBody
		if b == nil {
			continue
		}
		if bs == nil {
			bs = &extauthzv3.BufferSettings{AllowPartialMessage: true}
		}
		bs.MaxRequestBytes = max(bs.MaxRequestBytes, uint32(b.MaxBytes))
		bs.AllowPartialMessage = bs.AllowPartialMessage && b.AllowPartialMessage
		bs.PackAsBytes = bs.PackAsBytes || b.PackAsBytes
	}
	return bs
}

func envoyInbound(si *svcInfo, n Node, name string, port int) *listenerv3.Listener {
	az := &extauthzv3.ExtAuthz{
		Services: &extauthzv3.ExtAuthz_GrpcService{GrpcService: &corev3.GrpcService{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: EnforcerCluster}},
			Timeout:         durationpb.New(time.Second),
		}},
		TransportApiVersion:    corev3.ApiVersion_V3,
		FailureModeAllow:       false, // fail closed
		IncludePeerCertificate: true,
		WithRequestBody:        requestBody(si.authz),
	}
	local := &routev3.Route{
		Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: fmt.Sprintf("inbound|%d", port)}}},
	}
	if ext := authzContext(si.authz); ext != nil {
		// The ext_authz server reads them from the CheckRequest's
		// context_extensions: writ-enforcer and writ-proxy honour the
		// mode, and policies may read both.
		local.TypedPerFilterConfig = map[string]*anypb.Any{wellknown.HTTPExternalAuthorization: mustAny(&extauthzv3.ExtAuthzPerRoute{
			Override: &extauthzv3.ExtAuthzPerRoute_CheckSettings{CheckSettings: &extauthzv3.CheckSettings{ContextExtensions: ext}},
		})}
	}
	h := &hcmv3.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name:         name,
			VirtualHosts: []*routev3.VirtualHost{{Name: "local", Domains: []string{"*"}, Routes: []*routev3.Route{local}}},
		}},
		HttpFilters:                  []*hcmv3.HttpFilter{httpFilter(wellknown.HTTPExternalAuthorization, az), httpFilter(wellknown.Router, &routerv3.Router{})},
		ForwardClientCertDetails:     hcmv3.HttpConnectionManager_SANITIZE_SET,
		SetCurrentClientCertDetails:  &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true},
		UseRemoteAddress:             wrapperspb.Bool(true),
		NormalizePath:                wrapperspb.Bool(true),
		MergeSlashes:                 true,
		PathWithEscapedSlashesAction: hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT,
	}
	return &listenerv3.Listener{
		Name:    name,
		Address: sockAddr(normalizeAddr(n.Address), port),
		FilterChains: []*listenerv3.FilterChain{{
			Filters:         []*listenerv3.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(h)}}},
			TransportSocket: downstreamTLS(FlavorEnvoy),
		}},
	}
}

// envoyOutbound makes one HTTP listener per port on 127.0.0.1 whose route
// configuration (RDS) is the port's services as virtual hosts.
func envoyOutbound(m *Mesh, refs []string) ([]*listenerv3.Listener, error) {
	ports := map[int]bool{}
	for _, ref := range refs {
		for _, p := range m.services[ref].spec.Ports {
			if p.Protocol != config.ProtocolTCP {
				ports[p.Port] = true
			}
		}
	}
	var out []*listenerv3.Listener
	for _, port := range slices.Sorted(maps.Keys(ports)) {
		name := fmt.Sprintf("outbound|127.0.0.1:%d", port)
		h := &hcmv3.HttpConnectionManager{
			StatPrefix:     name,
			RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{ConfigSource: ads(), RouteConfigName: fmt.Sprintf("outbound|%d", port)}},
			HttpFilters:    []*hcmv3.HttpFilter{httpFilter(wellknown.Fault, &faultv3.HTTPFault{}), httpFilter(wellknown.Router, &routerv3.Router{})},
		}
		out = append(out, &listenerv3.Listener{
			Name:         name,
			Address:      sockAddr("127.0.0.1", port),
			FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(h)}}}}},
		})
	}
	return out, nil
}

func tcpListener(ref string, p config.ServicePort) (*listenerv3.Listener, error) {
	name := fmt.Sprintf("outbound|tcp|%s:%d", ref, p.Port)
	tp := &tcpproxyv3.TcpProxy{StatPrefix: name, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: ClusterName(ref, p.Port, "")}}
	return &listenerv3.Listener{
		Name:         name,
		Address:      sockAddr("127.0.0.1", p.Port),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{Name: wellknown.TCPProxy, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(tp)}}}}},
	}, nil
}

// rootSecret is the trust bundle as an SDS validation context.
func rootSecret(m *Mesh) *tlsv3.Secret {
	if len(m.Bundle) == 0 {
		return nil
	}
	var pemBytes []byte
	for _, c := range m.Bundle {
		pemBytes = append(pemBytes, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return &tlsv3.Secret{Name: RootSecret, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: pemBytes}},
	}}}
}

// localCluster is Envoy's route from an inbound listener to the local
// application on the loopback interface: on appPort, or the same port
// when that is zero.
func localCluster(port, appPort int) *clusterv3.Cluster {
	name := fmt.Sprintf("inbound|%d", port)
	if appPort == 0 {
		appPort = port
	}
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(time.Second),
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: sockAddr("127.0.0.1", appPort)}}}},
		}}},
	}
}
