package xds

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	healthv3 "github.com/envoyproxy/go-control-plane/envoy/service/health/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/writmesh/writ/store/pgtest"
)

// testPKI is a throwaway CA issuing SVID-shaped certificates, so the ADS
// server sees real verified TLS chains.
type testPKI struct {
	ca   *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &testPKI{ca: ca, key: key, pool: pool}
}

func (p *testPKI) leaf(t testing.TB, id string, dns ...string) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(id)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{u}, DNSNames: dns, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

type adsEnv struct {
	srv   *Server
	store *Store
	addr  string
	pki   *testPKI
	reg   *prometheus.Registry
}

// startADS runs a Server on a real TLS gRPC listener that verifies client
// certificates against a test CA.
func startADS(t testing.TB) *adsEnv { return startADSWithClock(t, nil) }

func startADSWithClock(t testing.TB, clock clockwork.Clock) *adsEnv {
	t.Helper()
	pool := pgtest.NewMigrated(t)
	store := NewStore(pool, clock)
	pki := newTestPKI(t)
	reg := prometheus.NewRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	srv := NewServer(ctx, ServerOptions{Store: store, Pool: pool, TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), Replica: "test", Metrics: reg, Clock: clock, Grace: 30 * time.Second})
	cert := pki.leaf(t, "spiffe://example.org/writ/control-plane", "localhost")
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pki.pool})))
	srv.Register(g)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{}, 2)
	go func() { _ = g.Serve(l); done <- struct{}{} }()
	go func() { _ = srv.Run(ctx); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); g.Stop(); <-done; <-done })
	return &adsEnv{srv: srv, store: store, addr: l.Addr().String(), pki: pki, reg: reg}
}

// adsClient is a minimal state-of-the-world ADS client.
type adsClient struct {
	stream discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *corev3.Node
	cc     *grpc.ClientConn
}

func (e *adsEnv) dial(t testing.TB, id, nodeID string, md map[string]any) *adsClient {
	t.Helper()
	cert := e.pki.leaf(t, id)
	cc, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, RootCAs: e.pki.pool, ServerName: "localhost"})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	n := &corev3.Node{Id: nodeID}
	if md != nil {
		s, err := structpb.NewStruct(md)
		if err != nil {
			t.Fatal(err)
		}
		n.Metadata = s
	}
	return &adsClient{stream: stream, node: n, cc: cc}
}

func (c *adsClient) request(typeURL string, names []string, version, nonce string, nack string) error {
	req := &discoverygrpc.DiscoveryRequest{Node: c.node, TypeUrl: typeURL, ResourceNames: names, VersionInfo: version, ResponseNonce: nonce}
	if nack != "" {
		req.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: nack}
	}
	return c.stream.Send(req)
}

func (c *adsClient) recv(t testing.TB) *discoverygrpc.DiscoveryResponse {
	t.Helper()
	type res struct {
		r   *discoverygrpc.DiscoveryResponse
		err error
	}
	ch := make(chan res, 1)
	go func() { r, err := c.stream.Recv(); ch <- res{r, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("recv: %v", r.err)
		}
		return r.r
	case <-time.After(20 * time.Second):
		t.Fatal("no response in 20 s")
	}
	return nil
}

func TestADSNackKeepsLastGood(t *testing.T) {
	e := startADS(t)
	ctx := context.Background()
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, meshYAML), false); err != nil {
		t.Fatal(err)
	}
	c := e.dial(t, "spiffe://example.org/ns/demo/sa/client", "client-1", map[string]any{MetaProxy: "grpc", MetaNamespace: "demo"})
	if err := c.request(resource.RouteType, []string{"greeter.demo:50051"}, "", "", ""); err != nil {
		t.Fatal(err)
	}
	r1 := c.recv(t)
	if len(r1.Resources) != 1 || r1.VersionInfo == "" {
		t.Fatalf("first response: %d resources, version %q", len(r1.Resources), r1.VersionInfo)
	}
	if err := c.request(resource.RouteType, []string{"greeter.demo:50051"}, r1.VersionInfo, r1.Nonce, ""); err != nil { // ACK
		t.Fatal(err)
	}
	// A change: the node refuses it.
	updated := strings.Replace(strings.Replace(meshYAML, "weight: 80", "weight: 50", 1), "weight: 20", "weight: 50", 1)
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, updated), false); err != nil {
		t.Fatal(err)
	}
	r2 := c.recv(t)
	if r2.VersionInfo == r1.VersionInfo {
		t.Fatal("no new version pushed")
	}
	if err := c.request(resource.RouteType, []string{"greeter.demo:50051"}, r1.VersionInfo, r2.Nonce, "weights not supported"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		ns := e.srv.Nodes()
		return len(ns) == 1 && strings.Contains(ns[0].LastError, "weights not supported") && ns[0].Version == r1.VersionInfo
	})
	if got := testutil.ToFloat64(e.srv.nacks.WithLabelValues(resource.RouteType)); got != 1 {
		t.Fatalf("nack metric = %v, want 1", got)
	}
	// A rebuild with the same (refused) content is not pushed again; a
	// new change is.
	e.srv.Kick()
	third := updated + "      timeout: 3s\n"
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, third), false); err != nil {
		t.Fatal(err)
	}
	r3 := c.recv(t)
	if r3.VersionInfo == r1.VersionInfo || r3.VersionInfo == r2.VersionInfo {
		t.Fatalf("third push has version %q (first %q, refused %q)", r3.VersionInfo, r1.VersionInfo, r2.VersionInfo)
	}
}

// TestADSRefusedTakenLater: a node that ACKs a version it refused
// (xdsclient.RetryRefused after a policy reload) has it in force again,
// but not once a newer version has been pushed: an ACK of the refused one
// crossing that push is stale and must not put it back.
func TestADSRefusedTakenLater(t *testing.T) {
	e := startADS(t)
	ctx := context.Background()
	names := []string{"greeter.demo:50051"}
	apply := func(y string) {
		t.Helper()
		if _, err := e.store.Apply(ctx, "test", mustDecode(t, y), false); err != nil {
			t.Fatal(err)
		}
	}
	node := func(version, acked string) func() bool {
		return func() bool {
			ns := e.srv.Nodes()
			return len(ns) == 1 && ns[0].Version == version && ns[0].Acked == acked
		}
	}
	apply(meshYAML)
	c := e.dial(t, "spiffe://example.org/ns/demo/sa/client", "client-1", map[string]any{MetaProxy: "grpc", MetaNamespace: "demo"})
	if err := c.request(resource.RouteType, names, "", "", ""); err != nil {
		t.Fatal(err)
	}
	r1 := c.recv(t)
	if err := c.request(resource.RouteType, names, r1.VersionInfo, r1.Nonce, ""); err != nil {
		t.Fatal(err)
	}
	updated := strings.Replace(strings.Replace(meshYAML, "weight: 80", "weight: 50", 1), "weight: 20", "weight: 50", 1)
	apply(updated)
	r2 := c.recv(t)
	if err := c.request(resource.RouteType, names, r1.VersionInfo, r2.Nonce, "rule not defined"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, node(r1.VersionInfo, r1.VersionInfo))
	// Taken after all: it is current and acknowledged again.
	if err := c.request(resource.RouteType, names, r2.VersionInfo, r2.Nonce, ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, node(r2.VersionInfo, r2.VersionInfo))
	if ns := e.srv.Nodes(); ns[0].LastError != "" {
		t.Fatalf("last error %q after the refused version was taken", ns[0].LastError)
	}

	// Refused again, then a newer version is pushed before the node's
	// ACK of the refused one arrives.
	third := updated + "      timeout: 3s\n"
	apply(third)
	r3 := c.recv(t)
	if err := c.request(resource.RouteType, names, r2.VersionInfo, r3.Nonce, "rule not defined"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, node(r2.VersionInfo, r2.VersionInfo))
	apply(strings.Replace(third, "timeout: 3s", "timeout: 4s", 1))
	r4 := c.recv(t)
	if err := c.request(resource.RouteType, names, r3.VersionInfo, r3.Nonce, ""); err != nil { // stale
		t.Fatal(err)
	}
	if err := c.request(resource.RouteType, names, r4.VersionInfo, r4.Nonce, ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, node(r4.VersionInfo, r4.VersionInfo))
}

// TestADSRefusedOfferedOnNewStream: a node that refused a version and
// comes back on a new stream while its old one still lingers here (a
// half-open connection writd has not noticed) is offered writd's current
// version again, not the last good one put back on the NACK: it may have
// reloaded its policy meanwhile. Refused again, the reason is recorded
// and the last good one is back; taken, it is in force.
func TestADSRefusedOfferedOnNewStream(t *testing.T) {
	e := startADS(t)
	ctx := context.Background()
	names := []string{"greeter.demo:50051"}
	md := map[string]any{MetaProxy: "grpc", MetaNamespace: "demo"}
	node := func(version, acked, lastErr string) func() bool {
		return func() bool {
			ns := e.srv.Nodes()
			return len(ns) == 1 && ns[0].Version == version && ns[0].Acked == acked && strings.Contains(ns[0].LastError, lastErr)
		}
	}
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, meshYAML), false); err != nil {
		t.Fatal(err)
	}
	old := e.dial(t, "spiffe://example.org/ns/demo/sa/client", "client-1", md)
	if err := old.request(resource.RouteType, names, "", "", ""); err != nil {
		t.Fatal(err)
	}
	r1 := old.recv(t)
	if err := old.request(resource.RouteType, names, r1.VersionInfo, r1.Nonce, ""); err != nil {
		t.Fatal(err)
	}
	updated := strings.Replace(strings.Replace(meshYAML, "weight: 80", "weight: 50", 1), "weight: 20", "weight: 50", 1)
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, updated), false); err != nil {
		t.Fatal(err)
	}
	r2 := old.recv(t)
	if err := old.request(resource.RouteType, names, r1.VersionInfo, r2.Nonce, "rule not defined"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, node(r1.VersionInfo, r1.VersionInfo, "rule not defined"))

	// The old stream stays open: the node's state outlives it.
	c := e.dial(t, "spiffe://example.org/ns/demo/sa/client", "client-1", md)
	if err := c.request(resource.RouteType, names, "", "", ""); err != nil {
		t.Fatal(err)
	}
	got := c.recv(t)
	if got.VersionInfo != r2.VersionInfo {
		t.Fatalf("new stream got version %s, want the current %s (last good %s)", got.VersionInfo, r2.VersionInfo, r1.VersionInfo)
	}
	// Still refused: recorded, and the last good one is current again.
	if err := c.request(resource.RouteType, names, r1.VersionInfo, got.Nonce, "rule still not defined"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, node(r1.VersionInfo, r1.VersionInfo, "rule still not defined"))
	if n := testutil.ToFloat64(e.srv.nacks.WithLabelValues(resource.RouteType)); n != 2 {
		t.Fatalf("nack metric = %v, want 2", n)
	}

	// Once more on a third stream, and this time taken.
	c3 := e.dial(t, "spiffe://example.org/ns/demo/sa/client", "client-1", md)
	if err := c3.request(resource.RouteType, names, "", "", ""); err != nil {
		t.Fatal(err)
	}
	if got = c3.recv(t); got.VersionInfo != r2.VersionInfo {
		t.Fatalf("third stream got version %s, want %s", got.VersionInfo, r2.VersionInfo)
	}
	if err := c3.request(resource.RouteType, names, got.VersionInfo, got.Nonce, ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, node(r2.VersionInfo, r2.VersionInfo, ""))
}

func TestADSRefusesMismatchedClaims(t *testing.T) {
	e := startADS(t)
	tests := []struct {
		name, id, node string
		md             map[string]any
		want           codes.Code
	}{
		{"other namespace", "spiffe://example.org/ns/demo/sa/client", "n1", map[string]any{MetaNamespace: "prod"}, codes.PermissionDenied},
		{"other service", "spiffe://example.org/ns/demo/sa/client", "n2", map[string]any{MetaService: "greeter", MetaAddress: "127.0.0.1", MetaPorts: []any{float64(1)}}, codes.PermissionDenied},
		{"not a workload", "spiffe://example.org/node/n1", "n3", nil, codes.PermissionDenied},
		{"other trust domain", "spiffe://evil.org/ns/demo/sa/client", "n4", nil, codes.PermissionDenied},
		{"service without ports", "spiffe://example.org/ns/demo/sa/greeter", "n5", map[string]any{MetaService: "greeter", MetaAddress: "127.0.0.1"}, codes.InvalidArgument},
		{"app port for a port not served", "spiffe://example.org/ns/demo/sa/greeter", "n6", map[string]any{MetaService: "greeter", MetaAddress: "127.0.0.1", MetaPorts: []any{float64(15006)}, MetaAppPorts: map[string]any{"15007": float64(8080)}}, codes.InvalidArgument},
		{"app port out of range", "spiffe://example.org/ns/demo/sa/greeter", "n7", map[string]any{MetaService: "greeter", MetaAddress: "127.0.0.1", MetaPorts: []any{float64(15006)}, MetaAppPorts: map[string]any{"15006": float64(70000)}}, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := e.dial(t, tt.id, tt.node, tt.md)
			// io.EOF from Send means the server has already ended the
			// stream (it can refuse before reading the request); its
			// status comes from Recv.
			if err := c.request(resource.ListenerType, []string{"x"}, "", "", ""); err != nil && !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			_, err := c.stream.Recv()
			if got := grpcstatus.Code(err); got != tt.want {
				t.Fatalf("got %v (%v), want %v", got, err, tt.want)
			}
		})
	}
	// A node id in use by one identity cannot be taken by another.
	a := e.dial(t, "spiffe://example.org/ns/demo/sa/a", "shared", nil)
	if err := a.request(resource.ListenerType, []string{"x"}, "", "", ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(e.srv.Nodes()) == 1 })
	b := e.dial(t, "spiffe://example.org/ns/demo/sa/b", "shared", nil)
	if err := b.request(resource.ListenerType, []string{"x"}, "", "", ""); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if _, err := b.stream.Recv(); grpcstatus.Code(err) != codes.PermissionDenied {
		t.Fatalf("node id takeover: %v", err)
	}
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 20 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRegistryFollowsStreams: a serving workload registers through its
// node metadata, its endpoint reaches clients over EDS, and it leaves the
// registry (and the clients' endpoints) once its stream has been closed
// for the grace period.
func TestRegistryFollowsStreams(t *testing.T) {
	clock := clockwork.NewFakeClock()
	e := startADSWithClock(t, clock)
	ctx := context.Background()
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, meshYAML), false); err != nil {
		t.Fatal(err)
	}
	cla := "outbound|50051|v2|greeter.demo"
	c := e.dial(t, "spiffe://example.org/ns/demo/sa/client", "client-1", map[string]any{MetaProxy: "grpc", MetaNamespace: "demo"})
	if err := c.request(resource.EndpointType, []string{cla}, "", "", ""); err != nil {
		t.Fatal(err)
	}
	r := c.recv(t)
	if n := countEndpoints(t, r); n != 0 {
		t.Fatalf("endpoints before any workload: %d", n)
	}
	srv := e.dial(t, "spiffe://example.org/ns/demo/sa/greeter", "greeter-v2", map[string]any{MetaProxy: "grpc", MetaNamespace: "demo",
		MetaService: "greeter", MetaAddress: "10.0.0.9", MetaPorts: []any{float64(50051)}, MetaLabels: map[string]any{"version": "v2"}})
	if err := srv.request(resource.ListenerType, []string{"writ/inbound/10.0.0.9:50051"}, "", "", ""); err != nil {
		t.Fatal(err)
	}
	if err := c.request(resource.EndpointType, []string{cla}, r.VersionInfo, r.Nonce, ""); err != nil {
		t.Fatal(err)
	}
	r = c.recv(t)
	if n := countEndpoints(t, r); n != 1 {
		t.Fatalf("endpoints after the workload joined: %d", n)
	}
	if err := c.request(resource.EndpointType, []string{cla}, r.VersionInfo, r.Nonce, ""); err != nil {
		t.Fatal(err)
	}
	// Each node gets only its own snapshot: the server's inbound listener
	// is not in the client's, even when the client asks for it by name.
	lc := e.dial(t, "spiffe://example.org/ns/demo/sa/client", "client-2", map[string]any{MetaProxy: "grpc", MetaNamespace: "demo"})
	if err := lc.request(resource.ListenerType, []string{"writ/inbound/10.0.0.9:50051", "greeter.demo"}, "", "", ""); err != nil {
		t.Fatal(err)
	}
	if lr := lc.recv(t); len(lr.Resources) != 1 {
		t.Fatalf("client asking for another node's listener got %d resources, want only greeter.demo", len(lr.Resources))
	}
	srv.cc.Close()
	waitFor(t, func() bool {
		var n int
		_ = e.store.pool.QueryRow(ctx, `SELECT count(*) FROM mesh_endpoints WHERE expires_at IS NOT NULL`).Scan(&n)
		return n == 1
	})
	if eps, _ := e.store.Endpoints(ctx); len(eps) != 1 {
		t.Fatalf("inside the grace period: %d endpoints", len(eps))
	}
	clock.Advance(31 * time.Second)
	r = c.recv(t)
	if n := countEndpoints(t, r); n != 0 {
		t.Fatalf("endpoints after the grace period: %d", n)
	}
}

func countEndpoints(t testing.TB, r *discoverygrpc.DiscoveryResponse) int {
	t.Helper()
	n := 0
	for _, a := range r.Resources {
		var cla endpointv3.ClusterLoadAssignment
		if err := a.UnmarshalTo(&cla); err != nil {
			t.Fatal(err)
		}
		for _, l := range cla.Endpoints {
			n += len(l.LbEndpoints)
		}
	}
	return n
}

// TestDeltaADS: a delta xDS client subscribes by name, gets the route,
// and receives the change when the configuration moves.
func TestDeltaADS(t *testing.T) {
	e := startADS(t)
	ctx := context.Background()
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, meshYAML), false); err != nil {
		t.Fatal(err)
	}
	c := e.dial(t, "spiffe://example.org/ns/demo/sa/client", "delta-1", map[string]any{MetaProxy: "envoy", MetaNamespace: "demo"})
	stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(c.cc).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoverygrpc.DeltaDiscoveryRequest{Node: c.node, TypeUrl: resource.RouteType, ResourceNamesSubscribe: []string{"outbound|50051"}}); err != nil {
		t.Fatal(err)
	}
	recv := func() *discoverygrpc.DeltaDiscoveryResponse {
		t.Helper()
		ch := make(chan *discoverygrpc.DeltaDiscoveryResponse, 1)
		go func() {
			r, err := stream.Recv()
			if err != nil {
				t.Error(err)
			}
			ch <- r
		}()
		select {
		case r := <-ch:
			if r == nil {
				t.FailNow()
			}
			return r
		case <-time.After(20 * time.Second):
			t.Fatal("no delta response in 20 s")
		}
		return nil
	}
	r1 := recv()
	if len(r1.Resources) != 1 || r1.Resources[0].Name != "outbound|50051" {
		t.Fatalf("first delta response: %v", r1.Resources)
	}
	if err := stream.Send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: resource.RouteType, ResponseNonce: r1.Nonce}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { ns := e.srv.Nodes(); return len(ns) == 1 && ns[0].Acked != "" })
	updated := strings.Replace(strings.Replace(meshYAML, "weight: 80", "weight: 50", 1), "weight: 20", "weight: 50", 1)
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, updated), false); err != nil {
		t.Fatal(err)
	}
	r2 := recv()
	if len(r2.Resources) != 1 || r2.Resources[0].Version == r1.Resources[0].Version {
		t.Fatalf("delta update: %v", r2.Resources)
	}
}

// TestDataPlaneHealthReports: a serving node's data plane reports its
// app's health over HDS; its endpoint is healthy in the registry only
// while it has ACKed its own listeners and reports its app healthy, and
// nobody else may report for it.
func TestDataPlaneHealthReports(t *testing.T) {
	e := startADS(t)
	ctx := context.Background()
	if _, err := e.store.Apply(ctx, "test", mustDecode(t, meshYAML), false); err != nil {
		t.Fatal(err)
	}
	const id = "spiffe://example.org/ns/demo/sa/greeter"
	srv := e.dial(t, id, "greeter-1", map[string]any{MetaNamespace: "demo", MetaService: "greeter", MetaAddress: "10.0.0.9", MetaPorts: []any{float64(15006)}})
	if err := srv.request(resource.ListenerType, nil, "", "", ""); err != nil {
		t.Fatal(err)
	}
	healthy := func() bool {
		eps, err := e.store.Endpoints(ctx)
		if err != nil || len(eps) != 1 {
			t.Fatalf("endpoints: %v, %v", eps, err)
		}
		return eps[0].Healthy
	}
	// Until the mesh is loaded the snapshot may be empty: take responses
	// (without ACKing, to keep the node not yet serving) until one holds
	// the inbound listener.
	r := srv.recv(t)
	for len(r.Resources) == 0 {
		if err := srv.request(resource.ListenerType, nil, "", r.Nonce, ""); err != nil {
			t.Fatal(err)
		}
		r = srv.recv(t)
	}
	hds := func(cc *grpc.ClientConn) healthv3.HealthDiscoveryService_StreamHealthCheckClient {
		st, err := healthv3.NewHealthDiscoveryServiceClient(cc).StreamHealthCheck(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&healthv3.HealthCheckRequestOrEndpointHealthResponse{RequestType: &healthv3.HealthCheckRequestOrEndpointHealthResponse_HealthCheckRequest{
			HealthCheckRequest: &healthv3.HealthCheckRequest{Node: &corev3.Node{Id: "greeter-1"}}}}); err != nil {
			t.Fatal(err)
		}
		return st
	}
	report := func(st healthv3.HealthDiscoveryService_StreamHealthCheckClient, hs corev3.HealthStatus) {
		if err := st.Send(&healthv3.HealthCheckRequestOrEndpointHealthResponse{RequestType: &healthv3.HealthCheckRequestOrEndpointHealthResponse_EndpointHealthResponse{
			EndpointHealthResponse: &healthv3.EndpointHealthResponse{EndpointsHealth: []*healthv3.EndpointHealth{{HealthStatus: hs}}}}}); err != nil {
			t.Fatal(err)
		}
	}
	// Reported down before it ACKs: the ACK does not make it healthy.
	st := hds(srv.cc)
	if _, err := st.Recv(); err != nil {
		t.Fatalf("specifier: %v", err)
	}
	report(st, corev3.HealthStatus_UNHEALTHY)
	waitFor(t, func() bool {
		e.srv.mu.Lock()
		defer e.srv.mu.Unlock()
		return e.srv.nodes["greeter-1"].appDown
	})
	// ACK until the node has ACKed the version in force (registering
	// may have rebuilt it meanwhile).
	acked := func() bool {
		e.srv.mu.Lock()
		defer e.srv.mu.Unlock()
		return e.srv.nodes["greeter-1"].healthy
	}
	for i := 0; !acked(); i++ {
		if i > 5 {
			t.Fatal("the node never ACKed its listeners")
		}
		if err := srv.request(resource.ListenerType, nil, r.VersionInfo, r.Nonce, ""); err != nil {
			t.Fatal(err)
		}
		e.srv.mu.Lock()
		current := e.srv.nodes["greeter-1"].version
		e.srv.mu.Unlock()
		if current == r.VersionInfo {
			waitFor(t, acked)
			break
		}
		r = srv.recv(t)
	}
	if healthy() {
		t.Fatal("healthy while its data plane reports the app down")
	}
	report(st, corev3.HealthStatus_HEALTHY)
	waitFor(t, healthy)
	report(st, corev3.HealthStatus_UNHEALTHY)
	waitFor(t, func() bool { return !healthy() })

	// Another identity may not report for the node.
	other := e.dial(t, "spiffe://example.org/ns/demo/sa/mallory", "mallory-1", nil)
	ost := hds(other.cc)
	if _, err := ost.Recv(); grpcstatus.Code(err) != codes.PermissionDenied {
		t.Fatalf("report for another's node: %v", err)
	}
}
