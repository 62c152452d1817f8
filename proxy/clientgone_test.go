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
)

// slowStreamApp answers /stream with a chunk every 50 ms for a minute,
// and /slowhead after a minute, reporting on gone when its request's
// context ends first; anything else gets "ok".
type slowStreamApp struct {
	started chan struct{}
	gone    chan struct{}
}

func (a *slowStreamApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/slowhead" {
		a.started <- struct{}{}
		select {
		case <-r.Context().Done():
			a.gone <- struct{}{}
		case <-time.After(time.Minute):
		}
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
				app := &slowStreamApp{started: make(chan struct{}, 1), gone: make(chan struct{}, 1)}
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
				select {
				case <-app.gone:
				case <-time.After(10 * time.Second):
					t.Fatal("the app's request was not cancelled after its client went away")
				}
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
// server reads in the background and cancels the request's context; the
// fast HTTP/1.1 path notices only when it writes, see docs/proxy.md).
func TestH2CClientGoneBeforeHead(t *testing.T) {
	for _, up := range []string{"h1", "h2"} {
		t.Run(up+"-upstream", func(t *testing.T) {
			ca := newTestCA(t)
			app := &slowStreamApp{started: make(chan struct{}, 1), gone: make(chan struct{}, 1)}
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
			select {
			case <-app.gone:
			case <-time.After(10 * time.Second):
				t.Fatal("the app's request was not cancelled after its client went away")
			}
		})
	}
}
