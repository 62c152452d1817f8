package proxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/writmesh/writ/internal/syncbuf"
)

// slowStreamApp answers /stream with a chunk every 50 ms for a minute,
// /slowhead after a minute, and /silent with a head and then nothing for
// a minute, reporting on gone when its request's context ends first;
// anything else gets "ok".
type slowStreamApp struct {
	started chan struct{}
	gone    chan struct{}
}

// waitGone says the request started, then waits (a minute at most) for
// its context to end and says so.
func (a *slowStreamApp) waitGone(r *http.Request) {
	a.started <- struct{}{}
	select {
	case <-r.Context().Done():
		a.gone <- struct{}{}
	case <-time.After(time.Minute):
	}
}

func newSlowStreamApp() *slowStreamApp {
	return &slowStreamApp{started: make(chan struct{}, 1), gone: make(chan struct{}, 1)}
}

// wantGone fails t unless the request waiting in the app (or, for
// who "peer", in the peer server) is cancelled within 10 s.
func (a *slowStreamApp) wantGone(t *testing.T, who string) {
	t.Helper()
	select {
	case <-a.gone:
	case <-time.After(10 * time.Second):
		t.Fatalf("the %s's request was not cancelled after its client went away", who)
	}
}

func (a *slowStreamApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/slowhead" {
		// net/http's server watches the connection only once the body
		// is read.
		io.Copy(io.Discard, r.Body)
		a.waitGone(r)
		return
	}
	if r.URL.Path == "/silent" {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		a.waitGone(r)
		return
	}
	if r.URL.Path != "/stream" {
		io.WriteString(w, "ok")
		return
	}
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
	a.started <- struct{}{}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for end := time.After(time.Minute); ; {
		select {
		case <-r.Context().Done():
			a.gone <- struct{}{}
			return
		case <-end:
			return
		case <-tick.C:
			io.WriteString(w, strings.Repeat("x", 512))
			w.(http.Flusher).Flush()
		}
	}
}

// goneH1 sends GET /stream over HTTP/1.1 on a connection of its own,
// reads the head and a little of the body, then closes the connection.
func goneH1(t *testing.T, addr string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /stream HTTP/1.1\r\nHost: server\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("stream: %d", resp.StatusCode)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
}

// h2cClient is a prior-knowledge h2c client for one connection, which
// it also hands to the test (to close it as a departing client would).
func h2cClient() (*http.Client, <-chan net.Conn) {
	conns := make(chan net.Conn, 1)
	tr := &http.Transport{Protocols: new(http.Protocols), DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, a)
		if err == nil {
			conns <- c
		}
		return c, err
	}}
	tr.Protocols.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: tr}, conns
}

// goneH2C does the same over h2c, closing the whole connection.
func goneH2C(t *testing.T, addr string) {
	t.Helper()
	cli, conns := h2cClient()
	resp, err := cli.Get("http://" + addr + "/stream")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
		t.Fatalf("stream: %d over %s", resp.StatusCode, resp.Proto)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	(<-conns).Close()
}

// TestClientGoneMidBody: a client that goes away while the answer
// streams (the fast path's HTTP/1.1 and net/http's h2c) frees what the
// request held upstream as soon as a write to it fails: the app sees
// its request cancelled, and with max_connections 1 (toward an HTTP/2
// peer, one stream) the next request is served at once instead of
// waiting the minute the answer would have lasted. HTTP/2 upstream: the
// stream is reset; HTTP/1.1: the connection is closed, not pooled
// mid-body.
func TestClientGoneMidBody(t *testing.T) {
	for _, up := range []string{"h1", "h2"} {
		for _, down := range []string{"h1", "h2c"} {
			t.Run(up+"-upstream/"+down+"-client", func(t *testing.T) {
				ca := newTestCA(t)
				app := newSlowStreamApp()
				cb := &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1}
				var addr string
				var cl *cluster
				if up == "h2" {
					cli := h2Client(t, ca, serveH2Peer(t, ca, 1, app), cb)
					addr, cl = cli.Addr("upstream:server"), cli.state.Load().clusters["server"]
				} else {
					p := startPairWith(t, ca, "/ns/demo/sa/client", nil, app, func(c *Cluster) { c.CircuitBreakers = cb })
					addr, cl = p.upstream, p.client.state.Load().clusters["server"]
				}
				if down == "h1" {
					goneH1(t, addr)
				} else {
					goneH2C(t, addr)
				}
				<-app.started
				app.wantGone(t, "app")
				select {
				case r := <-getAsync("http://"+addr+"/next", "2"):
					if r.err != nil || r.code != 200 {
						t.Fatalf("next request: %+v, want 200", r)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("the next request waited for what the gone client held")
				}
				// h2c keeps its protocol between the sidecars: its stream
				// rode an HTTP/2 connection of its own (reset, kept), the
				// next request the HTTP/1.1 one.
				want := int64(1)
				if up == "h1" && down == "h2c" {
					want = 2
				}
				if got := cl.openConns(); got != want {
					t.Fatalf("%d upstream connections open, want %d", got, want)
				}
			})
		}
	}
}

// TestH2CClientGoneBeforeHead: an h2c client that closes its connection
// while the app has not answered yet cancels the app's request (net/http's
// server reads in the background and cancels the request's context; for
// the fast HTTP/1.1 path see TestH1ClientGoneBeforeHead).
func TestH2CClientGoneBeforeHead(t *testing.T) {
	for _, up := range []string{"h1", "h2"} {
		t.Run(up+"-upstream", func(t *testing.T) {
			ca := newTestCA(t)
			app := newSlowStreamApp()
			var addr string
			if up == "h2" {
				addr = h2Client(t, ca, serveH2Peer(t, ca, 1, app), nil).Addr("upstream:server")
			} else {
				addr = startPair(t, ca, "/ns/demo/sa/client", nil, app).upstream
			}
			cli, conns := h2cClient()
			go cli.Get("http://" + addr + "/slowhead")
			<-app.started
			(<-conns).Close()
			app.wantGone(t, "app")
		})
	}
}

// watchFast is the threshold the tests watch clients after: short, so
// that they need not wait the default half second.
const watchFast = 20 * time.Millisecond

// outboundH1 is p's fast HTTP/1.1 server of its outbound listener.
func outboundH1(p *Proxy) *h1Server {
	p.lmu.Lock()
	defer p.lmu.Unlock()
	return p.outbound[0].h1
}

func goneCount(t *testing.T, p *Proxy, direction string) float64 {
	return counter(t, p.metrics.downstreamGone.WithLabelValues(direction))
}

// TestH1ClientGoneBeforeHead: an HTTP/1.1 client that goes away while
// the app has not answered yet (closing its connection, or only its
// sending side) gets the app's request cancelled: the fast server's
// watcher notices, the outbound closes its connection to the inbound,
// whose watcher notices in turn and closes its connection to the app.
// Each side counts one client gone and logs 499. Toward an HTTP/2
// cluster the request
// rides ReverseProxy, which follows the cancelled context and resets the
// stream.
func TestH1ClientGoneBeforeHead(t *testing.T) {
	for _, tc := range []struct {
		name, req string
		halfClose bool
		h2        bool
	}{
		{name: "close", req: "GET /slowhead HTTP/1.1\r\nHost: server\r\n\r\n"},
		{name: "body", req: "POST /slowhead HTTP/1.1\r\nHost: server\r\nContent-Length: 5\r\n\r\nhello"},
		{name: "half-close", req: "GET /slowhead HTTP/1.1\r\nHost: server\r\n\r\n", halfClose: true},
		{name: "h2-cluster", req: "GET /slowhead HTTP/1.1\r\nHost: server\r\n\r\n", h2: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca := newTestCA(t)
			app := newSlowStreamApp()
			alog := &syncbuf.Buffer{}
			p := startPairOpts(t, ca, "/ns/demo/sa/client", nil, app, func(c *Cluster) { c.HTTP2 = tc.h2 }, Options{WatchClientAfter: watchFast, AccessLog: alog})
			c, err := net.Dial("tcp", p.upstream)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := io.WriteString(c, tc.req); err != nil {
				t.Fatal(err)
			}
			<-app.started
			if tc.halfClose {
				c.(*net.TCPConn).CloseWrite()
			} else {
				c.Close()
			}
			app.wantGone(t, "app")
			waitFor(t, "the outbound to count its client gone", func() bool { return goneCount(t, p.client, "outbound") == 1 })
			if !tc.h2 {
				// An HTTP/2 stream reset reaches net/http's server, not
				// the fast one.
				waitFor(t, "the inbound to count its client gone", func() bool { return goneCount(t, p.server, "inbound") == 1 })
			}
			waitFor(t, "the outbound to log 499", func() bool {
				for _, line := range strings.Split(alog.String(), "\n") {
					if strings.Contains(line, `"direction":"outbound"`) && strings.Contains(line, `"status":499`) {
						return true
					}
				}
				return false
			})
		})
	}
}

// TestH1ClientGoneH2Upstream: toward an HTTP/2 peer (not a sidecar), the
// cancelled request's stream is reset and the peer's handler sees it.
func TestH1ClientGoneH2Upstream(t *testing.T) {
	ca := newTestCA(t)
	app := newSlowStreamApp()
	cfg := &Config{Clusters: []Cluster{{Name: "server", HTTP2: true, Endpoints: []Endpoint{{Address: serveH2Peer(t, ca, 1, app)}},
		PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), WatchClientAfter: watchFast})
	c, err := net.Dial("tcp", p.Addr("upstream:server"))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET /slowhead HTTP/1.1\r\nHost: server\r\n\r\n")
	<-app.started
	c.Close()
	app.wantGone(t, "peer")
}

// TestH1WatchKeepsPipelinedBytes: bytes of a pipelined request that the
// watcher reads while the first request waits (in two pieces, the head
// cut in the middle) are served after it, in order, on the same
// connection; so is a request after that. The inbound's watcher of the
// first request, on the mTLS connection between the sidecars, is stopped
// too, and that connection carries the next requests: stopping a watcher
// leaves a TLS connection usable. Nobody counts a client gone.
func TestH1WatchKeepsPipelinedBytes(t *testing.T) {
	ca := newTestCA(t)
	app := newHoldApp()
	defer app.free()
	p := startPairOpts(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			app.ServeHTTP(w, r)
			return
		}
		io.WriteString(w, "hello "+r.URL.Path)
	}), func(*Cluster) {}, Options{WatchClientAfter: watchFast})
	out, in := outboundH1(p.client), inboundH1(p.server)
	c, err := net.Dial("tcp", p.upstream)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /hold HTTP/1.1\r\nHost: server\r\n\r\n")
	<-app.arrived
	waitFor(t, "the outbound to watch the client", func() bool { return out.watched.Load() >= 1 })
	waitFor(t, "the inbound to watch the outbound", func() bool { return in.watched.Load() >= 1 })
	second := "GET /second HTTP/1.1\r\nHost: server\r\n\r\n"
	io.WriteString(c, second[:20])
	waitFor(t, "the watcher to read the first piece", func() bool { return out.readAhead.Load() >= 20 })
	io.WriteString(c, second[20:])
	waitFor(t, "the watcher to read the second piece", func() bool { return out.readAhead.Load() >= int64(len(second)) })
	app.free()
	br := bufio.NewReader(c)
	for _, want := range []string{"ok", "hello /second"} {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 || string(b) != want {
			t.Fatalf("got %d %q (%v), want 200 %q", resp.StatusCode, b, err, want)
		}
	}
	io.WriteString(c, "GET /third HTTP/1.1\r\nHost: server\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || string(b) != "hello /third" {
		t.Fatalf("third: %d %q", resp.StatusCode, b)
	}
	if n := p.client.state.Load().clusters["server"].openConns(); n != 1 {
		t.Fatalf("%d connections to the inbound, want the one", n)
	}
	if g, h := goneCount(t, p.client, "outbound"), goneCount(t, p.server, "inbound"); g != 0 || h != 0 {
		t.Fatalf("clients counted gone: %v outbound, %v inbound", g, h)
	}
}

// inboundH1 is p's fast HTTP/1.1 server of its inbound listener.
func inboundH1(p *Proxy) *h1Server {
	p.lmu.Lock()
	defer p.lmu.Unlock()
	return p.inbound[0].h1
}

// TestH1ClientGoneFreesSlot: with the cluster at max_connections 1, the
// connection a waiting request holds is freed when its client goes away,
// and the next request gets through at once rather than after the
// minute the app would have taken.
func TestH1ClientGoneFreesSlot(t *testing.T) {
	ca := newTestCA(t)
	app := newSlowStreamApp()
	p := startPairOpts(t, ca, "/ns/demo/sa/client", nil, app, func(c *Cluster) {
		c.CircuitBreakers = &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1}
	}, Options{WatchClientAfter: watchFast})
	c, err := net.Dial("tcp", p.upstream)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET /slowhead HTTP/1.1\r\nHost: server\r\n\r\n")
	<-app.started
	c.Close()
	select {
	case r := <-getAsync("http://"+p.upstream+"/next", "2"):
		if r.err != nil || r.code != 200 {
			t.Fatalf("next request: %+v, want 200", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the next request waited for the connection the gone client held")
	}
	<-app.gone
	if n := p.client.state.Load().clusters["server"].openConns(); n != 1 {
		t.Fatalf("%d upstream connections open, want 1", n)
	}
}

// TestH1ClientGoneSilentStream: a client that leaves an answer whose
// head it has but whose body does not come (a quiet event stream) is
// noticed too, not at the next write: the watcher runs until the
// handler returns, and the HTTP/1.1 transport's exchange stays
// registered while the body is read.
func TestH1ClientGoneSilentStream(t *testing.T) {
	ca := newTestCA(t)
	app := newSlowStreamApp()
	p := startPairOpts(t, ca, "/ns/demo/sa/client", nil, app, func(*Cluster) {}, Options{WatchClientAfter: watchFast})
	c, err := net.Dial("tcp", p.upstream)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET /silent HTTP/1.1\r\nHost: server\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("head: %v %v", resp, err)
	}
	<-app.started
	c.Close()
	app.wantGone(t, "app")
}

// TestH1ClientGoneAfterCloseAnswer: an answer without a body that ends
// its upstream connection (Connection: close) leaves no registration
// behind in the client connection's context: the next request on that
// connection is still interrupted when its client goes away.
func TestH1ClientGoneAfterCloseAnswer(t *testing.T) {
	ca := newTestCA(t)
	app := newSlowStreamApp()
	p := startPairOpts(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/close" {
			w.Header().Set("Connection", "close")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		app.ServeHTTP(w, r)
	}), func(*Cluster) {}, Options{WatchClientAfter: watchFast})
	c, err := net.Dial("tcp", p.upstream)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i := 0; i < 2; i++ {
		io.WriteString(c, "GET /close HTTP/1.1\r\nHost: server\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusNoContent || resp.Close {
			t.Fatalf("close answer: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	io.WriteString(c, "GET /slowhead HTTP/1.1\r\nHost: server\r\n\r\n")
	<-app.started
	c.Close()
	app.wantGone(t, "app")
}
