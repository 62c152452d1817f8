package proxy

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/regotest"
	"github.com/writmesh/writ/policy"
	"github.com/writmesh/writ/xds"
)

// matchMesh is a mesh whose route uses every kind of match writd's Route
// resource has, in an order where an earlier rule shadows a later one.
const matchMesh = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  rules:
    - match: {pathExact: /checkout}
      destinations: [{subset: v2}]
    - match: {pathRegex: "/items/[0-9]+"}
      destinations: [{subset: v2}]
    - match: {pathPrefix: /items, method: DELETE}
      destinations: [{subset: v2}]
    - match: {pathPrefix: /h, headers: [{name: X-Id, regex: "[a-f]+"}, {name: x-beta, present: true}, {name: x-env, prefix: eu-}]}
      destinations: [{subset: v2}]
    - match: {pathPrefix: /h, headers: [{name: x-env, exact: "us"}]}
      destinations: [{subset: v2}]
    - destinations: [{subset: v1}]
`

// TestWritdRouteMatches: the route configuration writd builds for a
// sidecar from a mesh using exact, regex, method and header matches is
// accepted and routes each request where the mesh says.
func TestWritdRouteMatches(t *testing.T) {
	rs, err := config.DecodeMesh("mesh.yaml", []byte(matchMesh))
	if err != nil {
		t.Fatal(err)
	}
	if err := config.CheckMesh(rs); err != nil {
		t.Fatal(err)
	}
	m := &xds.Mesh{TrustDomain: "example.org", Resources: rs, Endpoints: []xds.Endpoint{
		{NodeID: "orders-1", Service: "orders", Namespace: "shop", Labels: map[string]string{"version": "v1"}, Address: "127.0.0.1", Ports: []int{15006}, Healthy: true},
		{NodeID: "orders-2", Service: "orders", Namespace: "shop", Labels: map[string]string{"version": "v2"}, Address: "127.0.0.2", Ports: []int{15006}, Healthy: true},
	}}
	res, err := xds.Build(m, xds.Node{ID: "front-1", SPIFFEID: "spiffe://example.org/ns/shop/sa/frontend", Namespace: "shop", Address: "127.0.0.9", Flavor: xds.FlavorEnvoy})
	if err != nil {
		t.Fatal(err)
	}
	var rcs []*routev3.RouteConfiguration
	for _, r := range res[resource.RouteType] {
		rcs = append(rcs, r.(*routev3.RouteConfiguration))
	}
	var cs []*clusterv3.Cluster
	for _, c := range res[resource.ClusterType] {
		cs = append(cs, c.(*clusterv3.Cluster))
	}
	var las []*endpointv3.ClusterLoadAssignment
	for _, la := range res[resource.EndpointType] {
		las = append(las, la.(*endpointv3.ClusterLoadAssignment))
	}
	routes, err := RoutesFromEnvoy(rcs)
	if err != nil {
		t.Fatalf("writ-proxy refuses writd's routes: %v", err)
	}
	clusters, err := ClustersFromEnvoy(cs, las)
	if err != nil {
		t.Fatalf("writ-proxy refuses writd's clusters: %v", err)
	}
	cfg := &Config{Routes: routes, Clusters: clusters}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	st := &state{routes: map[string]*RouteConfig{}}
	for i := range cfg.Routes {
		st.routes[cfg.Routes[i].Name] = &cfg.Routes[i]
	}
	v1, v2 := xds.ClusterName("orders.shop", 8080, "v1"), xds.ClusterName("orders.shop", 8080, "v2")
	tests := []struct {
		name, method, path string
		header             http.Header
		want               string
	}{
		{"exact", "GET", "/checkout", nil, v2},
		{"exact, longer path", "GET", "/checkout/x", nil, v1},
		{"regex", "GET", "/items/7", nil, v2},
		{"regex, not whole path", "GET", "/items/7/reviews", nil, v1},
		{"method", "DELETE", "/items/x", nil, v2},
		{"other method", "GET", "/items/x", nil, v1},
		{"headers", "GET", "/h", http.Header{"X-Id": {"cafe"}, "X-Beta": {""}, "X-Env": {"eu-west"}}, v2},
		{"header regex fails", "GET", "/h", http.Header{"X-Id": {"cafe1"}, "X-Beta": {""}, "X-Env": {"eu-west"}}, v1},
		{"header absent", "GET", "/h", http.Header{"X-Id": {"cafe"}, "X-Env": {"eu-west"}}, v1},
		{"header exact", "GET", "/h", http.Header{"X-Env": {"us"}}, v2},
		{"default", "POST", "/", nil, v1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// writd's outbound route for port 8080 has the service by name
			// as a virtual host.
			r := st.route("outbound|8080", "orders.shop:8080", tt.method, tt.path, tt.header)
			if r == nil {
				t.Fatal("no route")
			}
			if got := r.Clusters[0].Name; got != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// TestWritdAuthorizationPolicyMode: the mode and decision of the
// AuthorizationPolicies writd binds to a service reach the sidecar's
// inbound listener through ext_authz's per-route context extensions.
func TestWritdAuthorizationPolicyMode(t *testing.T) {
	const svc = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
`
	policyPkg := func(name, mode, pkg string) string {
		return "---\napiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: " + name + ", namespace: shop}\nspec:\n  service: orders\n  package: " + pkg + "\n  mode: " + mode + "\n"
	}
	pol := func(name, mode string) string { return policyPkg(name, mode, "envoy.authz") }
	tests := []struct {
		name, mesh, mode, decision, dryRun string
		body                               RequestBody
	}{
		{"no policy", svc, "", "", "", RequestBody{}},
		{"enforce", svc + pol("a", "enforce"), AuthzEnforce, "data.envoy.authz.allow", "", RequestBody{}},
		{"dry-run", svc + pol("a", "dry-run"), AuthzDryRun, "data.envoy.authz.allow", "", RequestBody{}},
		{"enforce wins", svc + pol("a", "dry-run") + pol("b", "enforce"), AuthzEnforce, "data.envoy.authz.allow", "", RequestBody{}},
		{"several enforced, one dry-run beside", svc + policyPkg("a", "enforce", "team.b") + policyPkg("b", "enforce", "team.a") + pol("c", "dry-run"), AuthzEnforce, "data.team.a.allow,data.team.b.allow", "data.envoy.authz.allow", RequestBody{}},
		{"request body", svc + pol("a", "enforce") + "  requestBody: {maxBytes: 2048, allowPartialMessage: true, packAsBytes: true}\n", AuthzEnforce, "data.envoy.authz.allow", "",
			RequestBody{MaxBytes: 2048, AllowPartialMessage: true, PackAsBytes: true}},
	}
	// The policies of the teams, for the proxy to bind.
	dir := t.TempDir()
	for _, team := range []string{"a", "b"} {
		if err := os.WriteFile(filepath.Join(dir, team+".rego"), []byte("package team."+team+"\n\ndefault allow := false\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ca := newTestCA(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, err := config.DecodeMesh("mesh.yaml", []byte(tt.mesh))
			if err != nil {
				t.Fatal(err)
			}
			m := &xds.Mesh{TrustDomain: "example.org", Resources: rs}
			res, err := xds.Build(m, xds.Node{ID: "orders-1", SPIFFEID: "spiffe://example.org/ns/shop/sa/orders", Namespace: "shop", Service: "orders",
				Address: "127.0.0.1", Ports: []int{15006}, AppPorts: map[int]int{15006: 8080}, Flavor: xds.FlavorEnvoy})
			if err != nil {
				t.Fatal(err)
			}
			var ls []*listenerv3.Listener
			for _, l := range res[resource.ListenerType] {
				ls = append(ls, l.(*listenerv3.Listener))
			}
			var cs []*clusterv3.Cluster
			for _, c := range res[resource.ClusterType] {
				cs = append(cs, c.(*clusterv3.Cluster))
			}
			got, err := ListenersFromEnvoy(ls, cs, "orders")
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Inbound) != 1 {
				t.Fatalf("inbound: %+v", got.Inbound)
			}
			in := got.Inbound[0]
			if in.AuthzMode != tt.mode || in.AuthzDecision != tt.decision || in.AuthzDryRun != tt.dryRun {
				t.Fatalf("mode %q decision %q dry run %q, want %q %q %q", in.AuthzMode, in.AuthzDecision, in.AuthzDryRun, tt.mode, tt.decision, tt.dryRun)
			}
			if in.RequestBody != tt.body {
				t.Fatalf("request body %+v, want %+v", in.RequestBody, tt.body)
			}
			if !strings.HasPrefix(tt.decision, "data.team.") {
				return
			}
			// The sidecar binds the listener: no NACK for several
			// decisions when its policies define them.
			own := regotest.Enforcer(t, allowClientRego, &decisions{})
			eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir, DecisionPath: "data.team.a.allow"})
			if err != nil {
				t.Fatal(err)
			}
			b := enforcer.NewBinder(enforcer.Options{Engine: eng, Sink: &decisions{}}, func(ctx context.Context, d string) (*policy.Engine, error) {
				return policy.NewEngine(ctx, policy.Options{Dir: dir, DecisionPath: d})
			})
			in.Address = "127.0.0.1:0"
			startProxy(t, &Config{Inbound: []Inbound{in}}, Options{Source: ca.source(t, "/ns/shop/sa/orders"), Enforcer: own,
				EnforcerFor: func(d, dry string) (*enforcer.Enforcer, error) { return b.For(context.Background(), d, dry) }})
		})
	}
}

// TestWritdHealthChecks: the HTTP and gRPC active health checks writd
// emits for a TrafficPolicy become the proxy's checks.
func TestWritdHealthChecks(t *testing.T) {
	tests := []struct {
		name, check string
		want        HealthCheck
	}{
		{"http", "{type: http, path: /healthz, interval: 5s, timeout: 1s, unhealthyThreshold: 3, healthyThreshold: 2}",
			HealthCheck{HTTPPath: "/healthz", Interval: Duration(5 * time.Second), Timeout: Duration(time.Second), UnhealthyThreshold: 3, HealthyThreshold: 2}},
		{"grpc", "{type: grpc, grpcService: orders, interval: 5s, timeout: 1s}",
			HealthCheck{GRPC: true, GRPCService: "orders", Interval: Duration(5 * time.Second), Timeout: Duration(time.Second), UnhealthyThreshold: 1, HealthyThreshold: 1}},
		{"tcp", "{type: tcp, interval: 5s, timeout: 1s}",
			HealthCheck{Interval: Duration(5 * time.Second), Timeout: Duration(time.Second), UnhealthyThreshold: 1, HealthyThreshold: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mesh := matchMesh + "---\napiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: orders, namespace: shop}\nspec:\n  service: orders\n  healthCheck: " + tt.check + "\n"
			rs, err := config.DecodeMesh("mesh.yaml", []byte(mesh))
			if err != nil {
				t.Fatal(err)
			}
			if err := config.CheckMesh(rs); err != nil {
				t.Fatal(err)
			}
			res, err := xds.Build(&xds.Mesh{TrustDomain: "example.org", Resources: rs}, xds.Node{ID: "front-1", SPIFFEID: "spiffe://example.org/ns/shop/sa/frontend", Namespace: "shop", Address: "127.0.0.9", Flavor: xds.FlavorEnvoy})
			if err != nil {
				t.Fatal(err)
			}
			var cs []*clusterv3.Cluster
			for _, c := range res[resource.ClusterType] {
				cs = append(cs, c.(*clusterv3.Cluster))
			}
			got, err := ClustersFromEnvoy(cs, nil)
			if err != nil {
				t.Fatalf("writ-proxy refuses writd's clusters: %v", err)
			}
			if len(got) == 0 {
				t.Fatal("no clusters")
			}
			for _, c := range got {
				if c.HealthCheck == nil || !reflect.DeepEqual(*c.HealthCheck, tt.want) {
					t.Fatalf("cluster %s: health check %+v, want %+v", c.Name, c.HealthCheck, tt.want)
				}
			}
		})
	}
}

// TestWritdBreakersAndOutliers: a TrafficPolicy's connection pool and
// outlier detection, as writd emits them, become the proxy's thresholds;
// a policy that sets only consecutiveGatewayFailure ejects on gateway
// failures alone, as Envoy would with writd's enforcing percentages;
// success rate and failure percentage eject only where the policy turns
// them on, with its numbers or else Envoy's defaults.
func TestWritdBreakersAndOutliers(t *testing.T) {
	zero, p := 0, func(n int) *int { return &n }
	tests := []struct {
		name, policy string
		cb           CircuitBreakers
		od           OutlierDetection
	}{
		{"5xx and gateway",
			"  connectionPool: {maxConnections: 7, maxPendingRequests: 3, maxRequests: 50}\n  outlierDetection: {consecutive5xx: 4, consecutiveGatewayFailure: 2, interval: 1s, baseEjectionTime: 5s, maxEjectionTime: 1m, maxEjectionPercent: 50}\n",
			CircuitBreakers{MaxConnections: 7, MaxPendingRequests: 3, MaxRequests: 50},
			OutlierDetection{Consecutive5xx: 4, ConsecutiveGatewayFailure: 2, EnforcingConsecutiveGatewayFailure: 100, EnforcingSuccessRate: &zero,
				Interval: Duration(time.Second), BaseEjectionTime: Duration(5 * time.Second), MaxEjectionTime: Duration(time.Minute), MaxEjectionPercent: 50}},
		{"gateway only",
			"  connectionPool: {maxConnections: 1}\n  outlierDetection: {consecutiveGatewayFailure: 3}\n",
			CircuitBreakers{MaxConnections: 1},
			OutlierDetection{Consecutive5xx: 5, ConsecutiveGatewayFailure: 3, EnforcingConsecutive5xx: &zero, EnforcingConsecutiveGatewayFailure: 100, EnforcingSuccessRate: &zero, MaxEjectionPercent: 10}},
		{"success rate and failure percentage",
			"  outlierDetection: {enforcingSuccessRate: 60, successRateMinimumHosts: 3, successRateRequestVolume: 20, successRateStdevFactor: 1500,\n" +
				"    enforcingFailurePercentage: 100, failurePercentageThreshold: 0, failurePercentageMinimumHosts: 2, failurePercentageRequestVolume: 7}\n",
			CircuitBreakers{},
			OutlierDetection{Consecutive5xx: 5, ConsecutiveGatewayFailure: 5, EnforcingConsecutive5xx: &zero, MaxEjectionPercent: 10,
				EnforcingSuccessRate: p(60), SuccessRateMinimumHosts: 3, SuccessRateRequestVolume: 20, SuccessRateStdevFactor: 1500,
				EnforcingFailurePercentage: 100, FailurePercentageThreshold: p(0), FailurePercentageMinimumHosts: 2, FailurePercentageRequestVolume: 7}},
		{"failure percentage with Envoy's defaults",
			"  outlierDetection: {consecutive5xx: 3, enforcingFailurePercentage: 40}\n",
			CircuitBreakers{},
			OutlierDetection{Consecutive5xx: 3, ConsecutiveGatewayFailure: 5, EnforcingSuccessRate: &zero, MaxEjectionPercent: 10, EnforcingFailurePercentage: 40}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mesh := matchMesh + "---\napiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: orders, namespace: shop}\nspec:\n  service: orders\n" + tt.policy
			rs, err := config.DecodeMesh("mesh.yaml", []byte(mesh))
			if err != nil {
				t.Fatal(err)
			}
			if err := config.CheckMesh(rs); err != nil {
				t.Fatal(err)
			}
			res, err := xds.Build(&xds.Mesh{TrustDomain: "example.org", Resources: rs}, xds.Node{ID: "front-1", SPIFFEID: "spiffe://example.org/ns/shop/sa/frontend", Namespace: "shop", Address: "127.0.0.9", Flavor: xds.FlavorEnvoy})
			if err != nil {
				t.Fatal(err)
			}
			var cs []*clusterv3.Cluster
			for _, c := range res[resource.ClusterType] {
				if err := c.(*clusterv3.Cluster).Validate(); err != nil {
					t.Fatalf("writd's cluster is not valid: %v", err)
				}
				cs = append(cs, c.(*clusterv3.Cluster))
			}
			got, err := ClustersFromEnvoy(cs, nil)
			if err != nil {
				t.Fatalf("writ-proxy refuses writd's clusters: %v", err)
			}
			if len(got) == 0 {
				t.Fatal("no clusters")
			}
			for _, c := range got {
				if tt.cb == (CircuitBreakers{}) && c.CircuitBreakers != nil || tt.cb != (CircuitBreakers{}) && (c.CircuitBreakers == nil || *c.CircuitBreakers != tt.cb) {
					t.Errorf("cluster %s: circuit breakers %+v, want %+v", c.Name, c.CircuitBreakers, tt.cb)
				}
				if c.OutlierDetection == nil || !reflect.DeepEqual(*c.OutlierDetection, tt.od) {
					t.Errorf("cluster %s: outlier detection %+v, want %+v", c.Name, c.OutlierDetection, tt.od)
				}
			}
		})
	}
}

// TestRegexBoundsParity: a path or header regex is accepted by the mesh
// config's validation (writ apply) exactly when writ-proxy accepts it in
// the route configuration writd sends, so that nothing writd stores is
// NACKed by the sidecar for its regexes.
func TestRegexBoundsParity(t *testing.T) {
	patterns := []string{
		"/items/[0-9]+",
		"/" + strings.Repeat("a", 1023),
		"/" + strings.Repeat("a", 1024),
		"/a(b",
		"/a{1001}",
		`/(a)\1`,
		"/[a-z]{1000}[0-9]{1000}x{1000}",
		"/[a-z]{1000}[0-9]{1000}x{1000}y{1000}z{1000}",
	}
	for _, p := range patterns {
		for _, header := range []bool{false, true} {
			m := fmt.Sprintf("{pathRegex: %q}", p)
			sm := &matcherv3.RegexMatcher{Regex: p}
			match := &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: sm}}
			if header {
				m = fmt.Sprintf("{headers: [{name: x-id, regex: %q}]}", p)
				match = &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}, Headers: []*routev3.HeaderMatcher{{Name: "x-id",
					HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: sm}}}}}}
			}
			y := "apiVersion: writ.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: a\n  rules:\n    - match: " + m + "\n      destinations: [{subset: v1}]\n"
			_, cerr := config.DecodeMesh("r.yaml", []byte(y))
			_, perr := RoutesFromEnvoy([]*routev3.RouteConfiguration{{Name: "r", VirtualHosts: []*routev3.VirtualHost{{Name: "a", Domains: []string{"*"},
				Routes: []*routev3.Route{{Match: match, Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "a"}}}}}}}}})
			if (cerr == nil) != (perr == nil) {
				t.Errorf("regex %.40q (header %v): writ apply says %v, writ-proxy says %v", p, header, cerr, perr)
			}
		}
	}
}

// TestWritdFaultAndHashForms: a gRPC-status abort fault and a ring hash
// on the source address, which writ apply accepts, are followed by the
// sidecar rather than NACKed.
func TestWritdFaultAndHashForms(t *testing.T) {
	const mesh = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{port: 8080, protocol: grpc}]
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  rules:
    - destinations: [{subset: v1}]
      fault:
        abort: {grpcStatus: 14, percent: 50}
---
apiVersion: writ.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  loadBalancer: {policy: ring_hash, hashSource: true}
`
	rs, err := config.DecodeMesh("mesh.yaml", []byte(mesh))
	if err != nil {
		t.Fatal(err)
	}
	if err := config.CheckMesh(rs); err != nil {
		t.Fatal(err)
	}
	res, err := xds.Build(&xds.Mesh{TrustDomain: "example.org", Resources: rs}, xds.Node{ID: "front-1", SPIFFEID: "spiffe://example.org/ns/shop/sa/frontend", Namespace: "shop", Address: "127.0.0.9", Flavor: xds.FlavorEnvoy})
	if err != nil {
		t.Fatal(err)
	}
	var rcs []*routev3.RouteConfiguration
	for _, r := range res[resource.RouteType] {
		rcs = append(rcs, r.(*routev3.RouteConfiguration))
	}
	var cs []*clusterv3.Cluster
	for _, c := range res[resource.ClusterType] {
		cs = append(cs, c.(*clusterv3.Cluster))
	}
	routes, err := RoutesFromEnvoy(rcs)
	if err != nil {
		t.Fatal(err)
	}
	clusters, err := ClustersFromEnvoy(cs, nil)
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, rc := range routes {
		for _, vh := range rc.VirtualHosts {
			for _, r := range vh.Routes {
				if r.Fault != nil {
					found = true
					if r.Fault.AbortGRPCStatus != 14 || r.Fault.AbortStatus != 0 || r.Fault.AbortPercent != 50 || !r.HashSource {
						t.Fatalf("route %+v, fault %+v: want grpc abort 14 at 50%% and a source hash", r, r.Fault)
					}
				}
			}
		}
	}
	if !found {
		t.Fatalf("no faulty route in %+v", routes)
	}
	if err := (&Config{Clusters: clusters, Routes: routes}).Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
}
