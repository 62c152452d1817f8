package xdsclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/writmesh/writ/internal/syncbuf"
	"github.com/writmesh/writ/xds"
)

// resendServer is an ADS server that answers every request without a
// nonce, and every NACK, with the response of that type it holds now, as
// a control plane that resends a broken resource on every NACK does.
type resendServer struct {
	discoverygrpc.UnimplementedAggregatedDiscoveryServiceServer
	addr string

	mu    sync.Mutex
	cur   map[string]*discoverygrpc.DiscoveryResponse
	nonce int
	nacks map[string]int // by version NACKed
	// send is the open stream's Send, serialised by mu.
	send func(*discoverygrpc.DiscoveryResponse) error
}

func startResend(t *testing.T, ca *testCA) *resendServer {
	t.Helper()
	s := &resendServer{cur: map[string]*discoverygrpc.DiscoveryResponse{}, nacks: map[string]int{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	src := ca.source(t, "/writ/control-plane")
	cert := tls.Certificate{Certificate: [][]byte{src.svid.Certificates[0].Raw}, PrivateKey: src.svid.PrivateKey}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool})))
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s)
	done := make(chan struct{})
	go func() { _ = g.Serve(l); close(done) }()
	t.Cleanup(func() { g.Stop(); <-done })
	return s
}

// sendLocked sends the held response of type t with a fresh nonce.
func (s *resendServer) sendLocked(t string) error {
	r, ok := s.cur[t]
	if !ok || s.send == nil {
		return nil
	}
	s.nonce++
	out := &discoverygrpc.DiscoveryResponse{TypeUrl: t, VersionInfo: r.VersionInfo, Resources: r.Resources, Nonce: fmt.Sprint(s.nonce)}
	return s.send(out)
}

func (s *resendServer) StreamAggregatedResources(st discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	s.mu.Lock()
	s.send = st.Send
	s.mu.Unlock()
	for {
		req, err := st.Recv()
		if err != nil {
			return nil
		}
		s.mu.Lock()
		var serr error
		switch {
		case req.GetResponseNonce() == "":
			serr = s.sendLocked(req.GetTypeUrl())
		case req.GetErrorDetail() != nil:
			s.nacks[s.cur[req.GetTypeUrl()].GetVersionInfo()]++
			serr = s.sendLocked(req.GetTypeUrl())
		}
		s.mu.Unlock()
		if serr != nil {
			return serr
		}
	}
}

// set holds rs as version v and pushes it on the open stream.
func (s *resendServer) set(t *testing.T, rs xds.Resources, v string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, typ := range typeURLs {
		r := &discoverygrpc.DiscoveryResponse{TypeUrl: typ, VersionInfo: v}
		for _, m := range rs[typ] {
			a, err := anypb.New(m)
			if err != nil {
				t.Fatal(err)
			}
			r.Resources = append(r.Resources, a)
		}
		s.cur[typ] = r
	}
	for _, typ := range typeURLs {
		if err := s.sendLocked(typ); err != nil {
			t.Fatal(err)
		}
	}
}

// breakType holds a response of type typ and version v whose resource
// does not decode, and pushes it.
func (s *resendServer) breakType(t *testing.T, typ, v string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	// Field 1 (name) as a length-delimited field running past the end.
	bad := &anypb.Any{TypeUrl: typ, Value: []byte{0x0a, 0x7f, 'x'}}
	s.cur[typ] = &discoverygrpc.DiscoveryResponse{TypeUrl: typ, VersionInfo: v, Resources: []*anypb.Any{bad}}
	if err := s.sendLocked(typ); err != nil {
		t.Fatal(err)
	}
}

func (s *resendServer) nacksOf(v string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nacks[v]
}

// TestClientPausesOnUndecodableResponse: a server that answers every NACK
// with the same response that does not decode gets its NACKs at the
// growing pause a refused configuration takes (on the client's clock),
// not in a tight loop; each error is logged once, the configuration in
// force stays, and a later good response is taken.
func TestClientPausesOnUndecodableResponse(t *testing.T) {
	ca := newTestCA(t)
	srv := startResend(t, ca)
	clock := clockwork.NewFakeClockAt(time.Now())
	app := &applied{}
	logs := &syncbuf.Buffer{}
	md, err := xds.NodeMetadata(xds.FlavorEnvoy, "shop", "orders", "127.0.0.1", []int{15006}, map[string]string{"version": "v1"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(Options{Server: srv.addr, ServerID: spiffeid.RequireFromPath(td, "/writ/control-plane"), Source: ca.source(t, "/ns/shop/sa/orders"),
		Node: &corev3.Node{Id: "orders-1", Metadata: md}, Local: Local{Service: "orders", HTTPProxy: "127.0.0.1:15001"}, Apply: app.apply, Clock: clock,
		MinBackoff: time.Second, MaxBackoff: 4 * time.Second, Log: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv.set(t, build(t, meshYAML), "v1")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "first configuration applied", func() bool { return c.Status().Version == "v1" })

	// Two types break, so that their NACKs take turns.
	srv.breakType(t, resource.ListenerType, "broken")
	srv.breakType(t, resource.ClusterType, "broken")
	waitFor(t, "broken responses NACKed", func() bool { return srv.nacksOf("broken") >= 1 })
	// Move the clock through a 20 s window in steps. The pauses (1, 2,
	// 4, 4, ... s) let at most 7 more NACKs through it; a client that
	// NACKs at once sends hundreds while the steps take.
	for range 80 {
		clock.Advance(250 * time.Millisecond)
		time.Sleep(time.Millisecond)
	}
	if n := srv.nacksOf("broken"); n > 10 {
		t.Fatalf("%d NACKs of the same undecodable response in 20 s of the client's clock, want at most 10", n)
	}
	if n := strings.Count(logs.String(), "xds response undecodable"); n != 2 {
		t.Errorf("undecodable responses logged %d times, want once per type:\n%s", n, logs.String())
	}
	if st := c.Status(); st.Version != "v1" || !strings.Contains(st.LastError, "broken") {
		t.Fatalf("status while refusing: %+v", st)
	}
	if app.count() != 1 {
		t.Fatalf("applied %d configurations, want 1", app.count())
	}

	// A good response is still taken.
	srv.set(t, build(t, meshYAML+splitRoute), "v2")
	waitFor(t, "good configuration after the broken one", func() bool {
		clock.Advance(time.Second)
		return c.Status().Version == "v2"
	})
	if app.count() != 2 || c.Status().LastError != "" {
		t.Fatalf("applied %d, status %+v", app.count(), c.Status())
	}
}
