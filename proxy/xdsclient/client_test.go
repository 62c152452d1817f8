package xdsclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	healthv3 "github.com/envoyproxy/go-control-plane/envoy/service/health/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/proxy"
	"github.com/writmesh/writ/xds"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{td.ID().URL()}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key}
}

type staticSource struct {
	svid   *x509svid.SVID
	bundle *x509bundle.Bundle
}

func (s staticSource) GetX509SVID() (*x509svid.SVID, error) { return s.svid, nil }
func (s staticSource) GetX509BundleForTrustDomain(d spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.bundle.GetX509BundleForTrustDomain(d)
}

func (ca *testCA) source(t testing.TB, path string) staticSource {
	t.Helper()
	id := spiffeid.RequireFromPath(td, path)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{id.URL()}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return staticSource{svid: &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key},
		bundle: x509bundle.FromX509Authorities(td, []*x509.Certificate{ca.cert})}
}

const meshYAML = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
`

const splitRoute = `---
apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  rules:
    - match: {pathPrefix: /, headers: [{name: x-canary, exact: "1"}]}
      destinations: [{subset: v2}]
    - destinations:
        - {subset: v1, weight: 90}
        - {subset: v2, weight: 10}
      retries: {attempts: 2}
`

// regexRoute routes by a path regex; buildHuge sends it with the regex
// grown beyond writ-proxy's bound, which writ apply refuses but a control
// plane may still send (an older writd, another one), so that the proxy
// must NACK it.
var regexRoute = `---
apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  rules:
    - match: {pathRegex: "/items/[0-9]+"}
      destinations: [{subset: v1}]
`

// nackReason is what the proxy says of buildHuge's route.
const nackReason = "more than 1024"

// sidecar is orders v1's writ-proxy: mesh port 15006, app on 8080.
var sidecar = xds.Node{ID: "orders-1", SPIFFEID: "spiffe://example.org/ns/shop/sa/orders", Namespace: "shop", Service: "orders",
	Labels: map[string]string{"version": "v1"}, Address: "127.0.0.1", Ports: []int{15006}, AppPorts: map[int]int{15006: 8080}, Flavor: xds.FlavorEnvoy}

// build is what writd serves the sidecar for the mesh.
// buildHuge builds meshYAML with regexRoute, its regex then grown to
// 1,100 bytes.
func buildHuge(t *testing.T) xds.Resources {
	t.Helper()
	res := build(t, meshYAML+regexRoute)
	n := 0
	for _, r := range res[resource.RouteType] {
		for _, vh := range r.(*routev3.RouteConfiguration).GetVirtualHosts() {
			for _, rt := range vh.GetRoutes() {
				if re := rt.GetMatch().GetSafeRegex(); re != nil {
					re.Regex = "/items/" + strings.Repeat("x", 1100)
					n++
				}
			}
		}
	}
	if n == 0 {
		t.Fatal("no regex route to grow")
	}
	return res
}

func build(t *testing.T, yaml string) xds.Resources {
	t.Helper()
	return buildFor(t, sidecar, yaml)
}

func buildFor(t *testing.T, node xds.Node, yaml string) xds.Resources {
	t.Helper()
	rs, err := config.DecodeMesh("mesh.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	if err := config.CheckMesh(rs); err != nil {
		t.Fatal(err)
	}
	m := &xds.Mesh{TrustDomain: "example.org", Resources: rs, Endpoints: []xds.Endpoint{
		{NodeID: "orders-1", Service: "orders", Namespace: "shop", Labels: map[string]string{"version": "v1"}, Address: "127.0.0.1", Ports: []int{15006}, Healthy: true},
		{NodeID: "orders-2", Service: "orders", Namespace: "shop", Labels: map[string]string{"version": "v2"}, Address: "127.0.0.2", Ports: []int{15006}, Healthy: true},
		// Not yet serving: writd sends it UNHEALTHY.
		{NodeID: "orders-3", Service: "orders", Namespace: "shop", Labels: map[string]string{"version": "v2"}, Address: "127.0.0.3", Ports: []int{15006}},
	}}
	res, err := xds.Build(m, node)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func toSnapshot(t *testing.T, rs xds.Resources) *Snapshot {
	t.Helper()
	v := rs.Version()
	ps := map[string]*response{}
	for _, typ := range typeURLs {
		resp := &discoverygrpc.DiscoveryResponse{TypeUrl: typ}
		for _, r := range rs[typ] {
			a, err := anypb.New(r)
			if err != nil {
				t.Fatal(err)
			}
			resp.Resources = append(resp.Resources, a)
		}
		ms, err := decode(typ, resp)
		if err != nil {
			t.Fatal(err)
		}
		ps[typ] = &response{version: v, resources: ms}
	}
	return snapshot(v, ps)
}

// TestTranslateWritdResources: what writd's translation emits for a
// sidecar becomes the proxy configuration it means.
func TestTranslateWritdResources(t *testing.T) {
	snap := toSnapshot(t, build(t, meshYAML+splitRoute))
	cfg, err := Translate(snap, Local{Service: "orders", HTTPProxy: "127.0.0.1:15001", Upstreams: []Upstream{{Name: "orders", Address: "127.0.0.1:15002"}, {Name: "payments", Address: "127.0.0.1:15003"}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Inbound) != 1 {
		t.Fatalf("inbound: %+v", cfg.Inbound)
	}
	if in := cfg.Inbound[0]; in.Address != "127.0.0.1:15006" || in.App != "127.0.0.1:8080" || in.Service != "orders" {
		t.Errorf("inbound: %+v", in)
	}
	clusters := map[string]proxy.Cluster{}
	for _, c := range cfg.Clusters {
		clusters[c.Name] = c
	}
	v2 := clusters[xds.ClusterName("orders.shop", 8080, "v2")]
	if len(v2.Endpoints) != 1 || v2.Endpoints[0].Address != "127.0.0.2:15006" {
		t.Errorf("v2 endpoints: %+v (the unhealthy one must be left out)", v2.Endpoints)
	}
	if len(v2.PeerIDs) != 1 || v2.PeerIDs[0] != "spiffe://example.org/ns/shop/sa/orders" {
		t.Errorf("v2 peer ids: %v", v2.PeerIDs)
	}
	if _, ok := clusters["inbound|15006"]; ok {
		t.Error("the local app cluster was translated as a mesh cluster")
	}
	// writd's per-port outbound listeners are not bound by default; the
	// HTTP proxy and upstream ports are.
	names := map[string]proxy.Outbound{}
	for _, o := range cfg.Outbound {
		names[o.Name] = o
	}
	if len(names) != 3 || names[HTTPProxyName].Address != "127.0.0.1:15001" {
		t.Fatalf("outbound: %+v", cfg.Outbound)
	}
	routes := map[string]proxy.RouteConfig{}
	for _, r := range cfg.Routes {
		routes[r.Name] = r
	}
	up := routes[UpstreamNamePrefix+"orders"]
	if len(up.VirtualHosts) != 1 || up.VirtualHosts[0].Domains[0] != "*" {
		t.Fatalf("upstream route: %+v", up)
	}
	rs := up.VirtualHosts[0].Routes
	if len(rs) != 2 || rs[0].Headers[0].Name != "x-canary" || len(rs[1].Clusters) != 2 || rs[1].Clusters[0].Weight != 90 || rs[1].Retry == nil || rs[1].Retry.NumRetries != 2 {
		t.Errorf("orders routes: %+v", rs)
	}
	if len(routes[UpstreamNamePrefix+"payments"].VirtualHosts) != 0 {
		t.Error("an upstream for a service not in the mesh got routes")
	}
	var hosts []string
	for _, vh := range routes[HTTPProxyName].VirtualHosts {
		hosts = append(hosts, vh.Domains...)
	}
	if !strings.Contains(strings.Join(hosts, " "), "frontend.shop") || !strings.Contains(strings.Join(hosts, " "), "orders") {
		t.Errorf("http proxy hosts: %v", hosts)
	}

	// With OutboundPorts, writd's outbound listeners are bound too.
	cfg, err = Translate(snap, Local{Service: "orders", OutboundPorts: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Outbound) != 1 || cfg.Outbound[0].Address != "127.0.0.1:8080" || cfg.Outbound[0].Route != "outbound|8080" {
		t.Errorf("outbound ports: %+v", cfg.Outbound)
	}

	// A route the proxy cannot follow is an error naming it.
	_, err = Translate(toSnapshot(t, buildHuge(t)), Local{Service: "orders"})
	if err == nil || !strings.Contains(err.Error(), nackReason) || !strings.Contains(err.Error(), "outbound|8080") {
		t.Fatalf("regex route: %v", err)
	}
}

// TestTranslateTCPUpstream: --upstream NAME for a service whose only
// port is TCP binds a port spliced to its cluster, by short or full name.
func TestTranslateTCPUpstream(t *testing.T) {
	snap := toSnapshot(t, build(t, meshYAML+`---
apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  ports: [{port: 5432, protocol: tcp}]
`))
	cfg, err := Translate(snap, Local{Service: "orders", Upstreams: []Upstream{{Name: "db", Address: "127.0.0.1:15002"}, {Name: "db.shop", Address: "127.0.0.1:15003"}, {Name: "orders", Address: "127.0.0.1:15004"}}})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]proxy.Outbound{}
	for _, o := range cfg.Outbound {
		got[o.Address] = o
	}
	want := xds.ClusterName("db.shop", 5432, "")
	for _, addr := range []string{"127.0.0.1:15002", "127.0.0.1:15003"} {
		if o := got[addr]; o.Protocol != "tcp" || o.Cluster != want {
			t.Errorf("upstream %s: %+v, want tcp to %s", addr, o, want)
		}
	}
	if o := got["127.0.0.1:15004"]; o.Protocol != "http" {
		t.Errorf("HTTP service's upstream: %+v", o)
	}
}

// adsServer is go-control-plane's server over a snapshot cache on a real
// mTLS gRPC listener, recording what the client sends.
type adsServer struct {
	cache cachev3.SnapshotCache
	addr  string
	g     *grpc.Server
	ca    *testCA
	mu    sync.Mutex
	reqs  []*discoverygrpc.DiscoveryRequest
	// health records the statuses reported over HDS, by node id.
	health map[string][]corev3.HealthStatus
	// onRequest, if set, is called with each request before the server
	// handles it, as writd's callback is.
	onRequest func(*discoverygrpc.DiscoveryRequest)
}

// hdsRecorder stands in for writd's HDS service: it records reports.
type hdsRecorder struct {
	healthv3.UnimplementedHealthDiscoveryServiceServer
	s *adsServer
}

func (h hdsRecorder) StreamHealthCheck(st healthv3.HealthDiscoveryService_StreamHealthCheckServer) error {
	first, err := st.Recv()
	if err != nil {
		return err
	}
	node := first.GetHealthCheckRequest().GetNode().GetId()
	if err := st.Send(&healthv3.HealthCheckSpecifier{}); err != nil {
		return err
	}
	for {
		m, err := st.Recv()
		if err != nil {
			return nil
		}
		for _, e := range m.GetEndpointHealthResponse().GetEndpointsHealth() {
			h.s.mu.Lock()
			h.s.health[node] = append(h.s.health[node], e.GetHealthStatus())
			h.s.mu.Unlock()
		}
	}
}

func (s *adsServer) lastHealth(node string) corev3.HealthStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.health[node]
	if len(h) == 0 {
		return corev3.HealthStatus_UNKNOWN
	}
	return h[len(h)-1]
}

func startADS(t *testing.T, ca *testCA, serverPath, addr string) *adsServer {
	t.Helper()
	s := &adsServer{ca: ca, health: map[string][]corev3.HealthStatus{}}
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var l net.Listener
	var err error
	for i := 0; i < 100; i++ { // the address of a stopped server may take a moment to free
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	s.cache = cachev3.NewSnapshotCache(false, cachev3.IDHash{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	srv := serverv3.NewServer(ctx, s.cache, serverv3.CallbackFuncs{StreamRequestFunc: func(_ int64, r *discoverygrpc.DiscoveryRequest) error {
		s.mu.Lock()
		s.reqs = append(s.reqs, r)
		hook := s.onRequest
		s.mu.Unlock()
		if hook != nil {
			hook(r)
		}
		return nil
	}})
	src := ca.source(t, serverPath)
	cert := tls.Certificate{Certificate: [][]byte{src.svid.Certificates[0].Raw}, PrivateKey: src.svid.PrivateKey}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	s.g = grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool})))
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(s.g, srv)
	healthv3.RegisterHealthDiscoveryServiceServer(s.g, hdsRecorder{s: s})
	done := make(chan struct{})
	go func() { _ = s.g.Serve(l); close(done) }()
	t.Cleanup(func() { cancel(); s.g.Stop(); <-done })
	return s
}

func (s *adsServer) set(t *testing.T, rs xds.Resources) string {
	t.Helper()
	full := map[resource.Type][]types.Resource{}
	for _, typ := range typeURLs {
		full[typ] = append([]types.Resource{}, rs[typ]...)
	}
	v := rs.Version()
	snap, err := cachev3.NewSnapshot(v, full)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cache.SetSnapshot(context.Background(), "orders-1", snap); err != nil {
		t.Fatal(err)
	}
	return v
}

// answers returns the client's ACKs/NACKs of version (or, for NACKs, of
// responses it refused) per type.
func (s *adsServer) requests() []*discoverygrpc.DiscoveryRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*discoverygrpc.DiscoveryRequest(nil), s.reqs...)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 20 s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type applied struct {
	mu   sync.Mutex
	cfgs []*proxy.Config
	fail error
}

func (a *applied) apply(c *proxy.Config) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.fail != nil {
		return a.fail
	}
	a.cfgs = append(a.cfgs, c)
	return nil
}

func (a *applied) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.cfgs)
}

func (a *applied) last() *proxy.Config {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfgs[len(a.cfgs)-1]
}

func acked(reqs []*discoverygrpc.DiscoveryRequest, version string) int {
	n := 0
	for _, r := range reqs {
		if r.GetVersionInfo() == version && r.GetResponseNonce() != "" && r.GetErrorDetail() == nil {
			n++
		}
	}
	return n
}

// TestClientAcksNacksAndReconnects: the client applies and ACKs a
// configuration, NACKs one it cannot translate with the reason and keeps
// the old one, keeps it while the server is down, and reconnects (after
// backoff on its clock) to take the next one.
func TestClientAcksNacksAndReconnects(t *testing.T) {
	ca := newTestCA(t)
	srv := startADS(t, ca, "/writ/control-plane", "")
	clock := clockwork.NewFakeClockAt(time.Now())
	app := &applied{}
	md, err := xds.NodeMetadata(xds.FlavorEnvoy, "shop", "orders", "127.0.0.1", []int{15006}, map[string]string{"version": "v1"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(Options{Server: srv.addr, ServerID: spiffeid.RequireFromPath(td, "/writ/control-plane"), Source: ca.source(t, "/ns/shop/sa/orders"),
		Node: &corev3.Node{Id: "orders-1", Metadata: md}, Local: Local{Service: "orders", HTTPProxy: "127.0.0.1:15001"}, Apply: app.apply, Clock: clock,
		MinBackoff: time.Second, MaxBackoff: 4 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()

	v1 := srv.set(t, build(t, meshYAML))
	waitFor(t, "first configuration applied", func() bool { return app.count() == 1 })
	waitFor(t, "every type ACKed", func() bool { return acked(srv.requests(), v1) == len(typeURLs) })
	if st := c.Status(); st.Version != v1 || !st.Connected || st.LastError != "" {
		t.Fatalf("status: %+v", st)
	}
	if in := app.last().Inbound; len(in) != 1 || in[0].App != "127.0.0.1:8080" {
		t.Fatalf("applied inbound: %+v", in)
	}

	// A route it cannot follow: NACKed with the reason, every type at the
	// last good version, nothing applied.
	bad := srv.set(t, buildHuge(t))
	var nacks []*discoverygrpc.DiscoveryRequest
	waitFor(t, "NACK", func() bool {
		nacks = nil
		for _, r := range srv.requests() {
			if r.GetErrorDetail() != nil {
				nacks = append(nacks, r)
			}
		}
		// go-control-plane's plain cache sends the refused version again
		// on every NACK (writd puts the last good one back instead).
		return len(nacks) >= len(typeURLs)
	})

	for _, r := range nacks {
		if r.GetVersionInfo() != v1 || !strings.Contains(r.GetErrorDetail().GetMessage(), nackReason) {
			t.Errorf("NACK of %s: version %q, reason %q", r.GetTypeUrl(), r.GetVersionInfo(), r.GetErrorDetail().GetMessage())
		}
	}
	if st := c.Status(); st.Version != v1 || !strings.Contains(st.LastError, bad) || !strings.Contains(st.LastError, nackReason) {
		t.Fatalf("status after NACK: %+v", st)
	}
	if app.count() != 1 {
		t.Fatal("a refused configuration was applied")
	}
	// An Apply failure (say a port in use) is a NACK too.
	app.mu.Lock()
	app.fail = errors.New("outbound local:http_proxy: listen tcp 127.0.0.1:15001: bind: address already in use")
	app.mu.Unlock()
	v2 := srv.set(t, build(t, meshYAML+splitRoute))
	// The client answers a version refused again after a pause on its
	// clock (go-control-plane's cache sends it again on every NACK).
	waitFor(t, "NACK of an unappliable configuration", func() bool {
		clock.Advance(time.Second)
		return strings.Contains(c.Status().LastError, "address already in use")
	})
	if c.Status().Version != v1 {
		t.Fatal("an unappliable configuration replaced the one in force")
	}
	// Once it can be applied (go-control-plane's cache sends it again
	// after the NACK), it is.
	app.mu.Lock()
	app.fail = nil
	app.mu.Unlock()
	waitFor(t, "split applied", func() bool {
		clock.Advance(time.Second)
		return c.Status().Version == v2
	})

	// The dump shows the resources in force.
	b, err := c.Dump()
	if err != nil {
		t.Fatal(err)
	}
	var dump struct {
		XDS       Status
		Resources map[string][]json.RawMessage
	}
	if err := json.Unmarshal(b, &dump); err != nil {
		t.Fatal(err)
	}
	if dump.XDS.Version != v2 || len(dump.Resources[resource.ListenerType]) == 0 || !strings.Contains(string(b), "ext_authz") {
		t.Fatalf("config dump: %s", b)
	}

	// The server goes away: the configuration stays; the client retries
	// on its clock and takes the next configuration from the new server.
	addr := srv.addr
	srv.g.Stop()
	waitFor(t, "disconnected", func() bool { return !c.Status().Connected })
	if c.Status().Version != v2 {
		t.Fatal("configuration lost with the server")
	}
	srv2 := startADS(t, ca, "/writ/control-plane", addr)
	v3 := srv2.set(t, build(t, meshYAML))
	waitFor(t, "reconnected and applied", func() bool {
		clock.Advance(5 * time.Second)
		return c.Status().Version == v3
	})
	if app.count() != 3 {
		t.Fatalf("applied %d configurations, want 3", app.count())
	}
	waitFor(t, "ACKs on the new server", func() bool { return acked(srv2.requests(), v3) == len(typeURLs) })
}

// TestClientVerifiesServerID: a server with another SPIFFE ID gets no
// stream, and nothing is applied.
func TestClientVerifiesServerID(t *testing.T) {
	ca := newTestCA(t)
	srv := startADS(t, ca, "/ns/evil/sa/impostor", "")
	srv.set(t, build(t, meshYAML))
	app := &applied{}
	c, err := New(Options{Server: srv.addr, ServerID: spiffeid.RequireFromPath(td, "/writ/control-plane"), Source: ca.source(t, "/ns/shop/sa/orders"),
		Node: &corev3.Node{Id: "orders-1"}, Apply: app.apply, Clock: clockwork.NewFakeClockAt(time.Now())})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	waitFor(t, "handshake refused", func() bool { return strings.Contains(c.Status().LastError, "stream") })
	cancel()
	<-done
	if app.count() != 0 || len(srv.requests()) != 0 {
		t.Fatalf("an impostor server got %d requests and %d configurations applied", len(srv.requests()), app.count())
	}
	if !strings.Contains(c.Status().LastError, "impostor") {
		t.Errorf("the error does not name the unexpected server: %s", c.Status().LastError)
	}
}

// TestNodeMetadata: the node writ-proxy sends is one writd's registry
// reads: the keys are xds's, and the claims come out as meant.
func TestNodeMetadata(t *testing.T) {
	for got, want := range map[string]string{metaProxy: xds.MetaProxy, metaNamespace: xds.MetaNamespace, metaService: xds.MetaService,
		metaLabels: xds.MetaLabels, metaAddress: xds.MetaAddress, metaPorts: xds.MetaPorts, metaAppPorts: xds.MetaAppPorts} {
		if got != want {
			t.Errorf("metadata key %q, xds has %q", got, want)
		}
	}
	n, err := Node(NodeOptions{ID: "orders-1", Namespace: "shop", Service: "orders", Inbound: "127.0.0.1:15006", App: "127.0.0.1:8080", Labels: map[string]string{"version": "v1"}})
	if err != nil {
		t.Fatal(err)
	}
	want, err := xds.NodeMetadata(xds.FlavorEnvoy, "shop", "orders", "127.0.0.1", []int{15006}, map[string]string{"version": "v1"})
	if err != nil {
		t.Fatal(err)
	}
	want.Fields[xds.MetaAppPorts] = structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{"15006": structpb.NewNumberValue(8080)}})
	if !proto.Equal(n.GetMetadata(), want) {
		t.Errorf("metadata:\n got %v\nwant %v", n.GetMetadata(), want)
	}
	for _, bad := range []NodeOptions{
		{ID: "x", Namespace: "shop", Service: "orders", Inbound: "0.0.0.0:15006", App: "127.0.0.1:8080"},
		{ID: "x", Namespace: "shop", Service: "orders", Inbound: "127.0.0.1:15006", App: "10.0.0.1:8080"},
		{ID: "x", Namespace: "shop", Service: "orders", Inbound: "127.0.0.1", App: "127.0.0.1:8080"},
		{ID: "", Namespace: "shop"},
	} {
		if _, err := Node(bad); err == nil {
			t.Errorf("%+v: accepted", bad)
		}
	}
}

// TestAppCheckReports: the client probes the app behind its inbound
// listener on its clock and reports HEALTHY, then UNHEALTHY after the
// threshold of failed probes, then HEALTHY again.
func TestAppCheckReports(t *testing.T) {
	ca := newTestCA(t)
	srv := startADS(t, ca, "/writ/control-plane", "")
	appL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	appAddr := appL.Addr().String()
	_, port, err := splitPort(appAddr)
	if err != nil {
		t.Fatal(err)
	}
	node := sidecar
	node.AppPorts = map[int]int{15006: port}
	rs := buildFor(t, node, meshYAML)
	full := map[resource.Type][]types.Resource{}
	for _, typ := range typeURLs {
		full[typ] = append([]types.Resource{}, rs[typ]...)
	}
	snap, err := cachev3.NewSnapshot(rs.Version(), full)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.cache.SetSnapshot(context.Background(), "orders-1", snap); err != nil {
		t.Fatal(err)
	}
	clock := clockwork.NewFakeClockAt(time.Now())
	app := &applied{}
	c, err := New(Options{Server: srv.addr, ServerID: spiffeid.RequireFromPath(td, "/writ/control-plane"), Source: ca.source(t, "/ns/shop/sa/orders"),
		Node: &corev3.Node{Id: "orders-1"}, Local: Local{Service: "orders"}, Apply: app.apply, Clock: clock,
		AppCheck: AppCheck{Interval: time.Second, Threshold: 2}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "healthy reported", func() bool { return srv.lastHealth("orders-1") == corev3.HealthStatus_HEALTHY })
	appL.Close()
	waitFor(t, "unhealthy reported", func() bool {
		clock.Advance(time.Second)
		return srv.lastHealth("orders-1") == corev3.HealthStatus_UNHEALTHY
	})
	if c.AppHealthy() {
		t.Fatal("AppHealthy after the app went away")
	}
	appL2, err := net.Listen("tcp", appAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer appL2.Close()
	waitFor(t, "healthy again", func() bool {
		clock.Advance(time.Second)
		return srv.lastHealth("orders-1") == corev3.HealthStatus_HEALTHY
	})
}

// TestTranslateRegexRoutesStable: a configuration with compiled regex
// matches translates to an equal one every time, so that an unchanged
// push is not applied again (which would reset outlier and health state).
func TestTranslateRegexRoutesStable(t *testing.T) {
	const rx = `---
apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  rules:
    - match: {pathRegex: "/items/[0-9]+", headers: [{name: x-id, regex: "[a-f]+"}]}
      destinations: [{subset: v2}]
    - destinations: [{subset: v1}]
`
	snap := toSnapshot(t, build(t, meshYAML+rx))
	a, err := Translate(snap, Local{Service: "orders", OutboundPorts: true})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Translate(snap, Local{Service: "orders", OutboundPorts: true})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Fatal("two translations of one snapshot differ")
	}
	found := false
	for _, rc := range a.Routes {
		for _, vh := range rc.VirtualHosts {
			for _, r := range vh.Routes {
				found = found || r.Regex == "/items/[0-9]+" && len(r.Headers) == 1 && r.Headers[0].Regex == "[a-f]+"
			}
		}
	}
	if !found {
		t.Fatalf("no regex route in %+v", a.Routes)
	}
}

// TestClientRetriesRefusedAfterReload: a configuration refused because it
// could not be applied then (as writ-proxy refuses one binding a rule its
// policy lacks) is applied and ACKed on RetryRefused once it applies,
// without the server sending anything new. The server here does what
// writd does: on a NACK it puts the last good snapshot back (so nothing
// is sent again), and on an ACK of the refused version it makes that
// version current. The ACK names the refused version and the nonce of
// the response that carried it.
func TestClientRetriesRefusedAfterReload(t *testing.T) {
	ca := newTestCA(t)
	srv := startADS(t, ca, "/writ/control-plane", "")
	clock := clockwork.NewFakeClockAt(time.Now())
	app := &applied{}
	md, err := xds.NodeMetadata(xds.FlavorEnvoy, "shop", "orders", "127.0.0.1", []int{15006}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(Options{Server: srv.addr, ServerID: spiffeid.RequireFromPath(td, "/writ/control-plane"), Source: ca.source(t, "/ns/shop/sa/orders"),
		Node: &corev3.Node{Id: "orders-1", Metadata: md}, Local: Local{Service: "orders"}, Apply: app.apply, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()

	goodRS := build(t, meshYAML)
	v1 := srv.set(t, goodRS)
	waitFor(t, "first configuration ACKed", func() bool { return acked(srv.requests(), v1) == len(typeURLs) })

	badRS := build(t, meshYAML+splitRoute)
	var bad string
	srv.mu.Lock()
	srv.onRequest = func(r *discoverygrpc.DiscoveryRequest) {
		switch {
		case r.GetErrorDetail() != nil && r.GetTypeUrl() == resource.ListenerType:
			srv.set(t, goodRS)
		case r.GetErrorDetail() == nil && r.GetVersionInfo() == bad && r.GetTypeUrl() == resource.ListenerType:
			srv.set(t, badRS)
		}
	}
	srv.mu.Unlock()
	app.mu.Lock()
	app.fail = errors.New("inbound mesh: nothing defines decision path data.writ.nope.allow")
	app.mu.Unlock()
	bad = srv.set(t, badRS)
	nonces := map[string]string{}
	waitFor(t, "NACK", func() bool {
		for _, r := range srv.requests() {
			if r.GetErrorDetail() != nil {
				nonces[r.GetTypeUrl()] = r.GetResponseNonce()
			}
		}
		return len(nonces) == len(typeURLs)
	})
	nacks := len(srv.requests())

	// Still not applicable: nothing is sent, the reason stays.
	c.RetryRefused()
	waitFor(t, "retry refused again", func() bool { return app.count() == 1 && strings.Contains(c.Status().LastError, "data.writ.nope.allow") })
	clock.Advance(time.Minute)

	app.mu.Lock()
	app.fail = nil
	app.mu.Unlock()
	c.RetryRefused()
	waitFor(t, "refused version applied on retry", func() bool { return c.Status().Version == bad })
	waitFor(t, "refused version ACKed", func() bool { return acked(srv.requests(), bad) >= len(typeURLs) })
	reqs := srv.requests()
	if n := len(reqs); n < nacks+len(typeURLs) {
		t.Fatalf("%d requests after the NACKs, want at least %d", n, nacks+len(typeURLs))
	}
	for _, r := range reqs[nacks:] {
		if r.GetErrorDetail() != nil {
			t.Errorf("a retry sent a NACK: %v", r)
		}
	}
	for _, r := range reqs[nacks : nacks+len(typeURLs)] {
		if r.GetVersionInfo() != bad || r.GetResponseNonce() != nonces[r.GetTypeUrl()] {
			t.Errorf("ACK of %s after retry: version %q nonce %q, want %q %q", r.GetTypeUrl(), r.GetVersionInfo(), r.GetResponseNonce(), bad, nonces[r.GetTypeUrl()])
		}
	}
	if app.count() != 2 || c.Status().LastError != "" {
		t.Fatalf("applied %d configurations, status %+v", app.count(), c.Status())
	}
	if b, _ := json.Marshal(app.last()); !strings.Contains(string(b), `"weight":90`) {
		t.Errorf("applied %s, want the refused configuration (the 90/10 split)", b)
	}
}
