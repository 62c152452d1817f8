package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/writmesh/writ/enforcer/regotest"
)

// holdApp holds requests for /hold until release is closed, counting
// them as they arrive.
type holdApp struct {
	arrived chan string
	release chan struct{}
	once    sync.Once
	held    atomic.Int64
}

func newHoldApp() *holdApp {
	return &holdApp{arrived: make(chan string, 16), release: make(chan struct{})}
}

func (a *holdApp) free() { a.once.Do(func() { close(a.release) }) }

func (a *holdApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/hold" {
		a.held.Add(1)
		a.arrived <- r.Header.Get("X-Id")
		select {
		case <-a.release:
		case <-r.Context().Done():
		}
	}
	io.WriteString(w, "ok")
}

type result struct {
	code       int
	overloaded string
	err        error
}

func getAsync(url, id string) <-chan result {
	ch := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest("GET", url, nil)
		req.Header.Set("X-Id", id)
		// A client of its own per request: one connection each, so the
		// proxy sees them concurrently.
		c := &http.Client{Transport: &http.Transport{}}
		resp, err := c.Do(req)
		if err != nil {
			ch <- result{err: err}
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		ch <- result{code: resp.StatusCode, overloaded: resp.Header.Get("X-Envoy-Overloaded")}
	}()
	return ch
}

func counter(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func (c *cluster) openConns() int64 {
	c.conns.mu.Lock()
	defer c.conns.mu.Unlock()
	return c.conns.open
}

// TestMaxConnectionsAndPending: with max_connections 1 and
// max_pending_requests 1 toward one endpoint, of three concurrent slow
// requests one holds the connection, one waits for it and the third is
// refused at once with 503 and x-envoy-overloaded; when the first
// answers, the waiting one goes out on the same connection. Real
// sockets end to end: client, outbound proxy, mTLS, inbound proxy, app.
func TestMaxConnectionsAndPending(t *testing.T) {
	ca := newTestCA(t)
	app := newHoldApp()
	p := startPairWith(t, ca, "/ns/demo/sa/client", nil, app, func(c *Cluster) {
		c.CircuitBreakers = &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1}
	})
	t.Cleanup(app.free) // before the proxies drain, failed or not
	url := "http://" + p.upstream + "/hold"
	cl := p.client.state.Load().clusters["server"]

	first, second := fillOnePending(t, url, cl, app.arrived)
	if got := app.held.Load(); got != 1 {
		t.Fatalf("%d requests reached the app while one connection was busy, want 1", got)
	}
	if got := cl.openConns(); got != 1 {
		t.Fatalf("%d upstream connections open, want 1", got)
	}
	app.free()
	for i, ch := range []<-chan result{first, second} {
		if r := <-ch; r.err != nil || r.code != 200 {
			t.Fatalf("request %d: %+v, want 200", i+1, r)
		}
	}
	if id := <-app.arrived; id != "2" {
		t.Fatalf("second to arrive: %q", id)
	}
	if got := cl.openConns(); got != 1 {
		t.Fatalf("%d upstream connections open after the queue drained, want 1 (the pending request reused it)", got)
	}
	if got := counter(t, p.client.metrics.overflows.WithLabelValues("server", "max_pending_requests")); got != 1 {
		t.Fatalf("pending overflows = %v, want 1", got)
	}
	if got := counter(t, p.client.metrics.cxOverflows.WithLabelValues("server")); got != 2 {
		t.Fatalf("connection overflows = %v, want 2 (the waiting and the refused request)", got)
	}
	if got := counter(t, p.client.metrics.retries.WithLabelValues("server")); got != 0 {
		t.Fatalf("an overflow was retried (%v retries)", got)
	}
}

// TestPendingTimesOut: a request waiting for a connection gives up at
// its route timeout (504) and leaves the queue.
func TestPendingTimesOut(t *testing.T) {
	ca := newTestCA(t)
	app := newHoldApp()
	p := startPairWith(t, ca, "/ns/demo/sa/client", nil, app, func(c *Cluster) {
		c.CircuitBreakers = &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 4}
	})
	t.Cleanup(app.free)
	cfg := &Config{Clusters: p.client.Config().Clusters}
	cfg.AddUpstream("server", "127.0.0.1:0")
	cfg.Routes[0].VirtualHosts[0].Routes[0].Timeout = Duration(300 * time.Millisecond)
	if err := p.client.Update(cfg); err != nil {
		t.Fatal(err)
	}
	url := "http://" + p.upstream + "/hold"
	cl := p.client.state.Load().clusters["server"]
	first := getAsync(url, "1")
	<-app.arrived
	if r := <-getAsync(url, "2"); r.err != nil || r.code != http.StatusGatewayTimeout {
		t.Fatalf("pending request past its timeout: %+v, want 504", r)
	}
	if n := cl.conns.pending.Load(); n != 0 {
		t.Fatalf("%d requests still pending", n)
	}
	if r := <-first; r.code != http.StatusGatewayTimeout {
		t.Fatalf("held request past its timeout: %+v, want 504", r)
	}
}

// TestMaxConnectionsPerEndpointFloor: max_connections 1 across two
// endpoints still gives each one connection, as Envoy's pools do, so two
// concurrent requests are both served.
func TestMaxConnectionsPerEndpointFloor(t *testing.T) {
	ca := newTestCA(t)
	a, b := newHoldApp(), newHoldApp()
	pa := startPair(t, ca, "/ns/demo/sa/client", nil, a)
	pb := startPair(t, ca, "/ns/demo/sa/client", nil, b)
	cfg := &Config{Clusters: []Cluster{{Name: "server",
		Endpoints:       []Endpoint{{Address: pa.server.Addr("mesh")}, {Address: pb.server.Addr("mesh")}},
		PeerIDs:         []string{"spiffe://example.org/ns/demo/sa/server"},
		CircuitBreakers: &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	t.Cleanup(a.free)
	t.Cleanup(b.free)
	url := "http://" + cli.Addr("upstream:server") + "/hold"
	r1, r2 := getAsync(url, "1"), getAsync(url, "2")
	for _, app := range []*holdApp{a, b} {
		select {
		case <-app.arrived:
		case <-time.After(10 * time.Second):
			t.Fatal("an endpoint never got its request")
		}
	}
	if got := cli.state.Load().clusters["server"].openConns(); got != 2 {
		t.Fatalf("%d connections open, want 2 (one per endpoint)", got)
	}
	a.free()
	b.free()
	for _, ch := range []<-chan result{r1, r2} {
		if r := <-ch; r.code != 200 {
			t.Fatalf("request: %+v", r)
		}
	}
}

// TestMaxConnectionsHTTP2: an HTTP/2 cluster at max_connections 1 sends
// concurrent requests as streams of its one connection.
func TestMaxConnectionsHTTP2(t *testing.T) {
	ca := newTestCA(t)
	app := newHoldApp()
	p := startPairWith(t, ca, "/ns/demo/sa/client", nil, app, func(c *Cluster) {
		c.HTTP2 = true
		c.CircuitBreakers = &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1}
	})
	t.Cleanup(app.free)
	url := "http://" + p.upstream + "/hold"
	var rs []<-chan result
	for _, id := range []string{"1", "2", "3"} {
		rs = append(rs, getAsync(url, id))
		<-app.arrived
	}
	if got := p.client.state.Load().clusters["server"].openConns(); got != 1 {
		t.Fatalf("%d connections open, want 1", got)
	}
	app.free()
	for _, ch := range rs {
		if r := <-ch; r.code != 200 {
			t.Fatalf("request: %+v", r)
		}
	}
}

// TestConnLimitQueue: the limit's bookkeeping on its own: slots, the
// per-pool floor, first-come order, a raised bound and a waiter that
// gives up.
func TestConnLimitQueue(t *testing.T) {
	var cx, over int
	l := newConnLimit(func() { cx++ }, func() { over++ })
	l.set(2, 2)
	a, b := poolKey{poolH1, "a:1"}, poolKey{poolH1, "b:1"}
	for range 2 {
		if w, err := l.reserve(a); w != nil || err != nil {
			t.Fatalf("reserve under the bound: %v %v", w, err)
		}
	}
	// b has no connection in the pool: it may always open one.
	if w, err := l.reserve(b); w != nil || err != nil {
		t.Fatalf("reserve for an endpoint without connections: %v %v", w, err)
	}
	w1, err := l.reserve(a)
	if w1 == nil || err != nil {
		t.Fatalf("reserve at the bound: %v %v, want a waiter", w1, err)
	}
	w2, _ := l.reserve(b)
	if _, err := l.reserve(a); !errors.Is(err, errOverflow) {
		t.Fatalf("third waiter with max pending 2: %v, want overflow", err)
	}
	if cx != 3 || over != 1 {
		t.Fatalf("connection overflows %d, pending overflows %d; want 3, 1", cx, over)
	}
	// open is 3 (the floor let b exceed 2): one close is not enough.
	l.done(a)
	select {
	case <-w1.ch:
		t.Fatal("granted while still over the bound")
	default:
	}
	l.done(a)
	if g := <-w1.ch; g != (grant{}) {
		t.Fatal("a slot grant carried a connection")
	}
	// The waiter for b gives up; its place is freed.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.wait(ctx, w2, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	if l.pending.Load() != 0 || len(l.waiters) != 0 {
		t.Fatalf("pending %d, waiters %d after the queue emptied", l.pending.Load(), len(l.waiters))
	}
	// A raised bound lets a new waiter through at once.
	w3, _ := l.reserve(a)
	if w3 == nil {
		t.Fatal("want a waiter at the bound")
	}
	l.set(10, 2)
	if g := <-w3.ch; g != (grant{}) {
		t.Fatal("a slot grant carried a connection")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestMaxConnectionsTCP: spliced TCP counts too. With max_connections 1
// and max_pending_requests 1, a second connection waits for the first to
// close and is then spliced, a third is closed at once.
func TestMaxConnectionsTCP(t *testing.T) {
	ca := newTestCA(t)
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: echo.Addr().String()}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, &decisions{})})
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}},
		PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}, CircuitBreakers: &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1}}},
		Outbound: []Outbound{{Name: "tcp", Address: "127.0.0.1:0", Protocol: "tcp", Cluster: "server"}}}
	cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	cl := cli.state.Load().clusters["server"]
	roundTrip := func(c net.Conn, msg string) error {
		if _, err := io.WriteString(c, msg); err != nil {
			return err
		}
		buf := make([]byte, len(msg))
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		if string(buf) != msg {
			return fmt.Errorf("echo %q, want %q", buf, msg)
		}
		return nil
	}
	dial := func() net.Conn {
		c, err := net.Dial("tcp", cli.Addr("tcp"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	first := dial()
	if err := roundTrip(first, "one"); err != nil {
		t.Fatalf("first connection: %v", err)
	}
	second := dial()
	waitFor(t, "the second connection pending", func() bool { return cl.conns.pending.Load() == 1 })
	third := dial()
	_ = third.SetReadDeadline(time.Now().Add(10 * time.Second))
	var ne net.Error
	if n, err := third.Read(make([]byte, 1)); err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("third connection: read %d bytes, %v; want it closed", n, err)
	}
	first.Close()
	if err := roundTrip(second, "two"); err != nil {
		t.Fatalf("second connection after the first closed: %v", err)
	}
	if got := counter(t, cli.metrics.overflows.WithLabelValues("server", "max_pending_requests")); got != 1 {
		t.Fatalf("pending overflows = %v, want 1", got)
	}
}

// fillOnePending sends request "1", which must reach the app (arrived)
// and hold cl's one connection, then "2", which must wait as cl's one
// pending request, then "3", which must be refused at once with 503 and
// x-envoy-overloaded. It returns the first two's answers to come.
func fillOnePending(t *testing.T, url string, cl *cluster, arrived <-chan string) (first, second <-chan result) {
	t.Helper()
	first = getAsync(url, "1")
	if id := <-arrived; id != "1" {
		t.Fatalf("first to arrive: %q", id)
	}
	second = getAsync(url, "2")
	waitFor(t, "the second request pending", func() bool { return cl.conns.pending.Load() == 1 })
	third := <-getAsync(url, "3")
	if third.err != nil || third.code != http.StatusServiceUnavailable || third.overloaded != "true" {
		t.Fatalf("third request with one pending: %+v, want 503 with x-envoy-overloaded", third)
	}
	return first, second
}
