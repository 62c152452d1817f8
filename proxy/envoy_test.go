package proxy

import (
	"reflect"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultcommonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/fault/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func envoyCluster(t *testing.T, name string) *clusterv3.Cluster {
	utc := &tlsv3.UpstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
		ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
				SanType: tlsv3.SubjectAltNameMatcher_URI,
				Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "spiffe://example.org/ns/shop/sa/orders"}},
			}},
		}},
	}}
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}},
		ConnectTimeout:       durationpb.New(2 * time.Second),
		LbPolicy:             clusterv3.Cluster_LEAST_REQUEST,
		CircuitBreakers: &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
			MaxConnections: wrapperspb.UInt32(10), MaxPendingRequests: wrapperspb.UInt32(4),
			MaxRequests: wrapperspb.UInt32(100), MaxRetries: wrapperspb.UInt32(5),
		}}},
		OutlierDetection: &clusterv3.OutlierDetection{
			Consecutive_5Xx: wrapperspb.UInt32(3), BaseEjectionTime: durationpb.New(10 * time.Second), MaxEjectionPercent: wrapperspb.UInt32(50),
			ConsecutiveGatewayFailure: wrapperspb.UInt32(2), EnforcingConsecutiveGatewayFailure: wrapperspb.UInt32(100),
			EnforcingConsecutive_5Xx: wrapperspb.UInt32(0), Interval: durationpb.New(time.Second), MaxEjectionTime: durationpb.New(time.Minute),
		},
		TransportSocket: &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(t, utc)}},
	}
}

func loadAssignment(name string, addrs ...string) *endpointv3.ClusterLoadAssignment {
	la := &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{}}}
	for i, a := range addrs {
		la.Endpoints[0].LbEndpoints = append(la.Endpoints[0].LbEndpoints, &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
				Address: a, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(15006 + i)},
			}}},
		}}})
	}
	return la
}

func TestFromEnvoy(t *testing.T) {
	fault := &faultv3.HTTPFault{
		Delay: &faultcommonv3.FaultDelay{FaultDelaySecifier: &faultcommonv3.FaultDelay_FixedDelay{FixedDelay: durationpb.New(50 * time.Millisecond)},
			Percentage: &typev3.FractionalPercent{Numerator: 500, Denominator: typev3.FractionalPercent_TEN_THOUSAND}},
		Abort: &faultv3.FaultAbort{ErrorType: &faultv3.FaultAbort_HttpStatus{HttpStatus: 503},
			Percentage: &typev3.FractionalPercent{Numerator: 10}},
	}
	rc := &routev3.RouteConfiguration{Name: "orders", VirtualHosts: []*routev3.VirtualHost{{
		Name: "orders", Domains: []string{"orders", "orders.shop"},
		Routes: []*routev3.Route{
			{
				Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}, Headers: []*routev3.HeaderMatcher{{
					Name: "x-canary", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "yes"}}},
				}}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "orders-v2"}}},
			},
			{
				Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{
					ClusterSpecifier: &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{Clusters: []*routev3.WeightedCluster_ClusterWeight{
						{Name: "orders-v1", Weight: wrapperspb.UInt32(90)}, {Name: "orders-v2", Weight: wrapperspb.UInt32(10)},
					}}},
					Timeout: durationpb.New(3 * time.Second),
					RetryPolicy: &routev3.RetryPolicy{RetryOn: "5xx,connect-failure", NumRetries: wrapperspb.UInt32(2), PerTryTimeout: durationpb.New(time.Second),
						RetryBackOff: &routev3.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(10 * time.Millisecond), MaxInterval: durationpb.New(100 * time.Millisecond)}},
				}},
				TypedPerFilterConfig: map[string]*anypb.Any{faultFilterName: mustAny(t, fault)},
			},
		},
	}}}
	routes, err := RoutesFromEnvoy([]*routev3.RouteConfiguration{rc})
	if err != nil {
		t.Fatal(err)
	}
	clusters, err := ClustersFromEnvoy([]*clusterv3.Cluster{envoyCluster(t, "orders-v1"), envoyCluster(t, "orders-v2")},
		[]*endpointv3.ClusterLoadAssignment{loadAssignment("orders-v1", "10.0.0.1", "10.0.0.2"), loadAssignment("orders-v2", "10.0.0.3")})
	if err != nil {
		t.Fatal(err)
	}
	want := []Route{
		{Prefix: "/", Headers: []HeaderMatch{{Name: "x-canary", Exact: "yes"}}, Clusters: []WeightedCluster{{Name: "orders-v2", Weight: 1}}},
		{Prefix: "/", Clusters: []WeightedCluster{{Name: "orders-v1", Weight: 90}, {Name: "orders-v2", Weight: 10}}, Timeout: Duration(3 * time.Second),
			Retry: &RetryPolicy{RetryOn: []string{"5xx", "connect-failure"}, NumRetries: 2, PerTryTimeout: Duration(time.Second), BaseInterval: Duration(10 * time.Millisecond), MaxInterval: Duration(100 * time.Millisecond)},
			Fault: &Fault{DelayPercent: 5, Delay: Duration(50 * time.Millisecond), AbortPercent: 10, AbortStatus: 503}},
	}
	if got := routes[0].VirtualHosts[0].Routes; !reflect.DeepEqual(got, want) {
		t.Errorf("routes:\ngot  %+v\nwant %+v", got, want)
	}
	zero := 0
	wantCluster := Cluster{Name: "orders-v1", LBPolicy: LeastRequest, ConnectTimeout: Duration(2 * time.Second),
		Endpoints:       []Endpoint{{Address: "10.0.0.1:15006"}, {Address: "10.0.0.2:15007"}},
		PeerIDs:         []string{"spiffe://example.org/ns/shop/sa/orders"},
		CircuitBreakers: &CircuitBreakers{MaxConnections: 10, MaxPendingRequests: 4, MaxRequests: 100, MaxRetries: 5},
		OutlierDetection: &OutlierDetection{Consecutive5xx: 3, ConsecutiveGatewayFailure: 2, EnforcingConsecutive5xx: &zero, EnforcingConsecutiveGatewayFailure: 100,
			Interval: Duration(time.Second), BaseEjectionTime: Duration(10 * time.Second), MaxEjectionTime: Duration(time.Minute), MaxEjectionPercent: 50},
	}
	if !reflect.DeepEqual(clusters[0], wantCluster) {
		t.Errorf("cluster:\ngot  %+v\nwant %+v", clusters[0], wantCluster)
	}
	cfg := &Config{Routes: routes, Clusters: clusters}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("translated config does not validate: %v", err)
	}
	// Explicit HTTP/2 upstream options (writd's http2 and grpc ports) make
	// the hop between sidecars HTTP/2 whatever the app speaks.
	h2 := envoyCluster(t, "orders-grpc")
	h2.TypedExtensionProtocolOptions = map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(t, &upstreamhttpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}},
	})}
	got, err := ClustersFromEnvoy([]*clusterv3.Cluster{h2}, []*endpointv3.ClusterLoadAssignment{loadAssignment("orders-grpc", "10.0.0.4")})
	if err != nil || len(got) != 1 || !got[0].HTTP2 || clusters[0].HTTP2 {
		t.Errorf("HTTP/2 upstream options: %+v, %v (plain cluster HTTP2=%v)", got, err, clusters[0].HTTP2)
	}
}

func TestFromEnvoyRefusesWhatItCannotDo(t *testing.T) {
	plain := envoyCluster(t, "plain")
	plain.TransportSocket = nil
	maglev := envoyCluster(t, "maglev")
	maglev.LbPolicy = clusterv3.Cluster_MAGLEV
	_, err := ClustersFromEnvoy([]*clusterv3.Cluster{plain, maglev}, nil)
	for _, want := range []string{`cluster "plain": no transport_socket`, `cluster "maglev": lb_policy MAGLEV`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v, want an error containing %q", err, want)
		}
	}
	for name, hc := range map[string]*corev3.HealthCheck{
		"post check":  {HealthChecker: &corev3.HealthCheck_HttpHealthCheck_{HttpHealthCheck: &corev3.HealthCheck_HttpHealthCheck{Path: "/h", Method: corev3.RequestMethod_POST}}},
		"tcp payload": {HealthChecker: &corev3.HealthCheck_TcpHealthCheck_{TcpHealthCheck: &corev3.HealthCheck_TcpHealthCheck{Send: &corev3.HealthCheck_Payload{Payload: &corev3.HealthCheck_Payload_Text{Text: "00"}}}}},
		"redis":       {HealthChecker: &corev3.HealthCheck_CustomHealthCheck_{CustomHealthCheck: &corev3.HealthCheck_CustomHealthCheck{Name: "envoy.health_checkers.redis"}}},
	} {
		c := envoyCluster(t, "hc")
		hc.Timeout, hc.Interval = durationpb.New(time.Second), durationpb.New(time.Second)
		hc.UnhealthyThreshold, hc.HealthyThreshold = wrapperspb.UInt32(1), wrapperspb.UInt32(1)
		c.HealthChecks = []*corev3.HealthCheck{hc}
		if _, err := ClustersFromEnvoy([]*clusterv3.Cluster{c}, nil); err == nil || !strings.Contains(err.Error(), "health_checks") {
			t.Errorf("%s: got %v, want a health_checks error", name, err)
		}
	}
	for name, tt := range map[string]struct {
		match *routev3.RouteMatch
		want  string
	}{
		"separated prefix": {&routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: "/a"}}, "only prefix, path and safe_regex"},
		"huge regex":       {&routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: strings.Repeat("a", 1025)}}}, "more than 1024"},
		"big program":      {&routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "[a-z]{1000}[0-9]{1000}[a-z]{1000}[0-9]{1000}[a-z]{1000}"}}}, "instructions"},
		"bad regex":        {&routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "(["}}}, "missing closing"},
		"range header": {&routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}, Headers: []*routev3.HeaderMatcher{{Name: "x-n",
			HeaderMatchSpecifier: &routev3.HeaderMatcher_RangeMatch{RangeMatch: &typev3.Int64Range{Start: 1, End: 5}}}}}, "only present and string"},
		"path pseudo-header": {&routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}, Headers: []*routev3.HeaderMatcher{{Name: ":path",
			HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}}}}, ":method and :authority"},
		"query": {&routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}, QueryParameters: []*routev3.QueryParameterMatcher{{Name: "q",
			QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_PresentMatch{PresentMatch: true}}}}, "only path and header"},
	} {
		rc := &routev3.RouteConfiguration{Name: "r", VirtualHosts: []*routev3.VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []*routev3.Route{{
			Match:  tt.match,
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "c"}}},
		}}}}}
		if _, err := RoutesFromEnvoy([]*routev3.RouteConfiguration{rc}); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: got %v, want an error containing %q", name, err, tt.want)
		}
	}
}

// TestRouteMatchesFromEnvoy: each kind of Envoy path and header match
// becomes the proxy's, and the routes keep their order.
func TestRouteMatchesFromEnvoy(t *testing.T) {
	str := func(sm *matcherv3.StringMatcher) *routev3.HeaderMatcher_StringMatch {
		return &routev3.HeaderMatcher_StringMatch{StringMatch: sm}
	}
	to := &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "c"}}}
	rc := &routev3.RouteConfiguration{Name: "r", VirtualHosts: []*routev3.VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []*routev3.Route{
		{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: "/exact"}}, Action: to},
		{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "/items/[0-9]+"}}}, Action: to},
		{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: ""}, Headers: []*routev3.HeaderMatcher{
			{Name: ":method", HeaderMatchSpecifier: str(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "POST"}})},
			{Name: "X-Id", HeaderMatchSpecifier: str(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "[a-f]+"}}})},
			{Name: "x-env", HeaderMatchSpecifier: str(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: "-prod"}, IgnoreCase: true})},
			{Name: "x-debug", HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: false}},
			{Name: "x-user", InvertMatch: true},
			{Name: "Host", HeaderMatchSpecifier: str(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "orders"}})},
		}}, Action: to},
	}}}}
	got, err := RoutesFromEnvoy([]*routev3.RouteConfiguration{rc})
	if err != nil {
		t.Fatal(err)
	}
	rs := got[0].VirtualHosts[0].Routes
	want := []Route{
		{Path: "/exact"},
		{Regex: "/items/[0-9]+"},
		{Prefix: "/", Headers: []HeaderMatch{
			{Name: ":method", Exact: "POST"},
			{Name: "x-id", Regex: "[a-f]+"},
			{Name: "x-env", Suffix: "-prod", IgnoreCase: true},
			{Name: "x-debug", Invert: true},
			{Name: "x-user", Invert: true},
			{Name: ":authority", Contains: "orders"},
		}},
	}
	if len(rs) != len(want) {
		t.Fatalf("got %d routes, want %d", len(rs), len(want))
	}
	for i := range want {
		want[i].Clusters = []WeightedCluster{{Name: "c", Weight: 1}}
		if !reflect.DeepEqual(rs[i], want[i]) {
			t.Errorf("route %d:\ngot  %+v\nwant %+v", i, rs[i], want[i])
		}
	}
}
