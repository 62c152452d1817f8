package proxy

import (
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/writmesh/writ/enforcer/regotest"
)

// checkedCluster runs a client proxy whose cluster "server" has the one
// endpoint addr, checked by hc, and returns the endpoint and a function
// advancing the clock until cond holds.
func checkedCluster(t *testing.T, ca *testCA, addr string, hc *HealthCheck) (*endpoint, func(string, func() bool)) {
	t.Helper()
	clock := clockwork.NewFakeClock()
	hc.Interval, hc.Timeout, hc.UnhealthyThreshold, hc.HealthyThreshold = Duration(5*time.Second), Duration(2*time.Second), 1, 1
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: addr}},
		PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}, HealthCheck: hc}}}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), Clock: clock})
	e := p.state.Load().clusters["server"].eps[0]
	return e, func(what string, cond func() bool) {
		t.Helper()
		for i := 0; !cond(); i++ {
			if i > 2000 {
				t.Fatalf("%s never happened", what)
			}
			if i%50 == 0 {
				clock.Advance(5 * time.Second)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
}

// TestHTTPHealthCheck: an HTTP check travels to the peer sidecar over
// mTLS, through its policy, to its app: an app answering 503 on the check
// path takes the endpoint out of the pool, and back once it answers 200;
// expected_statuses widen what counts as healthy.
func TestHTTPHealthCheck(t *testing.T) {
	ca := newTestCA(t)
	var status atomic.Int32
	status.Store(http.StatusOK)
	var checks atomic.Int32
	p := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" && r.Header.Get("User-Agent") == healthUserAgent && r.Host == "server" {
			checks.Add(1)
			w.WriteHeader(int(status.Load()))
		}
	}))
	e, waitFor := checkedCluster(t, ca, p.server.Addr("mesh"), &HealthCheck{HTTPPath: "/healthz"})
	waitFor("a check reaching the app", func() bool { return checks.Load() > 0 })
	if e.unhealthy.Load() {
		t.Fatal("a 200 made the endpoint unhealthy")
	}
	status.Store(http.StatusServiceUnavailable)
	waitFor("the endpoint leaving the pool on 503", e.unhealthy.Load)
	status.Store(http.StatusOK)
	waitFor("the endpoint rejoining on 200", func() bool { return !e.unhealthy.Load() })

	status.Store(http.StatusNoContent)
	e2, waitFor2 := checkedCluster(t, ca, p.server.Addr("mesh"), &HealthCheck{HTTPPath: "/healthz", ExpectedStatuses: []StatusRange{{Start: 200, End: 300}}})
	n := checks.Load()
	waitFor2("a check with expected statuses", func() bool { return checks.Load() > n+1 })
	if e2.unhealthy.Load() {
		t.Fatal("204 within expected [200, 300) made the endpoint unhealthy")
	}
	waitFor("the 200-only check taking the 204 endpoint out", e.unhealthy.Load)
}

// TestHTTPHealthCheckDeniedByPolicy: a check the peer's policy does not
// allow fails: the check is a request from this workload like any other.
func TestHTTPHealthCheckDeniedByPolicy(t *testing.T) {
	ca := newTestCA(t)
	p := startPair(t, ca, "/ns/demo/sa/client", nil, echoApp(nil))
	// "other" is not allowed by the server's policy.
	clock := clockwork.NewFakeClock()
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: p.server.Addr("mesh")}},
		PeerIDs:     []string{"spiffe://example.org/ns/demo/sa/server"},
		HealthCheck: &HealthCheck{HTTPPath: "/", Interval: Duration(5 * time.Second), Timeout: Duration(2 * time.Second), UnhealthyThreshold: 1, HealthyThreshold: 1}}}}
	other := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/other"), Clock: clock})
	e := other.state.Load().clusters["server"].eps[0]
	for i := 0; !e.unhealthy.Load(); i++ {
		if i > 2000 {
			t.Fatal("a check denied by policy never took the endpoint out")
		}
		if i%50 == 0 {
			clock.Advance(5 * time.Second)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestGRPCHealthCheck: grpc.health.v1 through the peer sidecar to a gRPC
// app: NOT_SERVING takes the endpoint out, SERVING brings it back.
func TestGRPCHealthCheck(t *testing.T) {
	ca := newTestCA(t)
	appL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := health.NewServer()
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	go gs.Serve(appL)
	t.Cleanup(gs.Stop)
	hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appL.Addr().String()}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, &decisions{})})
	e, waitFor := checkedCluster(t, ca, srv.Addr("mesh"), &HealthCheck{GRPC: true, GRPCService: "orders"})
	hs.SetServingStatus("orders", healthpb.HealthCheckResponse_NOT_SERVING)
	waitFor("the endpoint leaving the pool on NOT_SERVING", e.unhealthy.Load)
	hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
	waitFor("the endpoint rejoining on SERVING", func() bool { return !e.unhealthy.Load() })

	// An unknown service is NOT_FOUND: unhealthy.
	e2, waitFor2 := checkedCluster(t, ca, srv.Addr("mesh"), &HealthCheck{GRPC: true, GRPCService: "nope"})
	waitFor2("an unknown service's endpoint leaving the pool", e2.unhealthy.Load)
}
