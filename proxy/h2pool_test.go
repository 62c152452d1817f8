package proxy

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/writmesh/writ/authority/svidtls"
)

// serveH2Peer serves h over mTLS HTTP/2 with the server's SVID, allowing
// streams concurrent streams per connection, and returns its address.
func serveH2Peer(t *testing.T, ca *testCA, streams uint32, h http.Handler) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go h2PeerServer(t, ca.source(t, "/ns/demo/sa/server"), streams, h).ServeTLS(l, "", "")
	return l.Addr().String()
}

// h2PeerServer is an mTLS HTTP/2-only server of h with src's SVID,
// allowing streams concurrent streams per connection (0: Go's default),
// closed when the test ends; the caller serves it on its listener.
func h2PeerServer(t *testing.T, src Source, streams uint32, h http.Handler) *http.Server {
	srv := &http.Server{Handler: h, TLSConfig: svidtls.ServerConfig(src, src, svidtls.AuthorizeMemberOf(td), clockwork.NewRealClock())}
	if streams > 0 {
		srv.HTTP2 = &http.HTTP2Config{MaxConcurrentStreams: int(streams)}
	}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP2(true)
	t.Cleanup(func() { srv.Close() })
	return srv
}

// h2Client is an outbound proxy whose cluster "server" speaks HTTP/2 to
// the one endpoint addr under the given circuit breakers.
func h2Client(t *testing.T, ca *testCA, addr string, cb *CircuitBreakers) *Proxy {
	t.Helper()
	cfg := &Config{Clusters: []Cluster{{Name: "server", HTTP2: true, Endpoints: []Endpoint{{Address: addr}},
		PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}, CircuitBreakers: cb}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	return startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
}

// tokenApp holds each request for /hold until it takes a token, so a
// test lets them go one at a time.
type tokenApp struct {
	arrived chan string
	token   chan struct{}
}

func (a *tokenApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.arrived <- r.Header.Get("X-Id")
	if r.URL.Path == "/stream" {
		// The answer starts before the token.
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
	}
	select {
	case <-a.token:
	case <-r.Context().Done():
	}
	if r.URL.Path == "/abort" {
		panic(http.ErrAbortHandler) // RST_STREAM
	}
	w.Write([]byte("ok"))
}

// TestH2PendingGetsFreedStream: toward a peer that allows one stream per
// connection, with max_connections 1 and max_pending_requests 1, a
// second request waits as a pending request and goes out on the stream
// the first frees, on the same connection; a third is refused with 503
// and x-envoy-overloaded, not retried. (net/http's pool gave the second
// request no freed stream: it waited for a new connection until the
// connect timeout and got 504.)
func TestH2PendingGetsFreedStream(t *testing.T) {
	ca := newTestCA(t)
	app := &tokenApp{arrived: make(chan string, 4), token: make(chan struct{})}
	cli := h2Client(t, ca, serveH2Peer(t, ca, 1, app), &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1})
	t.Cleanup(func() { close(app.token) })
	url := "http://" + cli.Addr("upstream:server") + "/hold"
	cl := cli.state.Load().clusters["server"]

	first, second := fillOnePending(t, url, cl, app.arrived)
	app.token <- struct{}{}
	if r := <-first; r.err != nil || r.code != 200 {
		t.Fatalf("first request: %+v, want 200", r)
	}
	select {
	case id := <-app.arrived:
		if id != "2" {
			t.Fatalf("second to arrive: %q", id)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the pending request was not given the stream the first freed")
	}
	app.token <- struct{}{}
	if r := <-second; r.err != nil || r.code != 200 {
		t.Fatalf("second request: %+v, want 200", r)
	}
	if got := cl.openConns(); got != 1 {
		t.Fatalf("%d upstream connections open, want 1", got)
	}
	if got := counter(t, cli.metrics.overflows.WithLabelValues("server", "max_pending_requests")); got != 1 {
		t.Fatalf("pending overflows = %v, want 1", got)
	}
	if got := counter(t, cli.metrics.retries.WithLabelValues("server")); got != 0 {
		t.Fatalf("an overflow was retried (%v retries)", got)
	}
}

// countApp counts the requests it serves by X-Id, taking a little time
// over each so that they overlap.
type countApp struct {
	mu   sync.Mutex
	seen map[string]int
}

func (a *countApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	a.seen[r.Header.Get("X-Id")]++
	a.mu.Unlock()
	time.Sleep(time.Millisecond)
	w.Write([]byte("ok"))
}

// TestH2PendingExactlyOnce: many concurrent requests through an HTTP/2
// cluster with small limits (two connections, a peer allowing two
// streams on each, eight pending) all end: each one answered 200
// reached the app exactly once, each one refused as an overflow never
// reached it, and nothing else happened to any.
func TestH2PendingExactlyOnce(t *testing.T) {
	ca := newTestCA(t)
	app := &countApp{seen: map[string]int{}}
	cli := h2Client(t, ca, serveH2Peer(t, ca, 2, app), &CircuitBreakers{MaxConnections: 2, MaxPendingRequests: 8})
	url := "http://" + cli.Addr("upstream:server") + "/"
	const n = 48
	rs := make([]<-chan result, n)
	for i := range rs {
		rs[i] = getAsync(url, strconv.Itoa(i))
	}
	codes := map[int]int{}
	for i, ch := range rs {
		r := <-ch
		id := strconv.Itoa(i)
		app.mu.Lock()
		seen := app.seen[id]
		app.mu.Unlock()
		switch {
		case r.err != nil:
			t.Errorf("request %d: %v", i, r.err)
		case r.code == 200 && seen == 1:
		case r.code == http.StatusServiceUnavailable && r.overloaded == "true" && seen == 0:
		default:
			t.Errorf("request %d: %+v, reached the app %d times", i, r, seen)
		}
		codes[r.code]++
	}
	if codes[200] == 0 {
		t.Fatalf("no request served: %v", codes)
	}
	if got := cli.state.Load().clusters["server"].openConns(); got > 2 {
		t.Fatalf("%d upstream connections open, want at most 2", got)
	}
	t.Log(fmt.Sprint("answers by status: ", codes))
}

// handoffListener hands the connections accepted on one socket to
// whichever of its servers is current, so that a test can shut one
// server down (its GOAWAY and close) while the address stays served.
// replaceablePeer listens on one address for a succession of HTTP/2
// peer servers of app, each allowing streams concurrent streams: serve
// starts the next one, which takes the connections accepted from then
// on (the one before keeps those it has).
func replaceablePeer(t *testing.T, ca *testCA, streams uint32, app http.Handler) (addr string, serve func() *http.Server) {
	t.Helper()
	src := ca.source(t, "/ns/demo/sa/server")
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	hl := &handoffListener{Listener: raw}
	start := func() *http.Server {
		srv := h2PeerServer(t, src, streams, app)
		go srv.ServeTLS(hl.next(), "", "")
		return srv
	}
	// run starts after the first serve: a connection accepted before any
	// server would have nowhere to go.
	var once sync.Once
	return raw.Addr().String(), func() *http.Server {
		srv := start()
		once.Do(func() { go hl.run() })
		return srv
	}
}

type handoffListener struct {
	net.Listener
	mu  sync.Mutex
	cur chan net.Conn
}

// next returns a listener for a new server: connections accepted from
// now on go to it.
func (h *handoffListener) next() net.Listener {
	ch := make(chan net.Conn)
	h.mu.Lock()
	h.cur = ch
	h.mu.Unlock()
	return &chanListener{ch: ch, addr: h.Addr(), done: make(chan struct{})}
}

func (h *handoffListener) run() {
	for {
		c, err := h.Accept()
		if err != nil {
			return
		}
		h.mu.Lock()
		ch := h.cur
		h.mu.Unlock()
		ch <- c
	}
}

type chanListener struct {
	ch   chan net.Conn
	addr net.Addr
	once sync.Once
	done chan struct{}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

// TestH2PendingAcrossGoAway: a request pending behind a connection
// whose peer then shuts down gracefully (GOAWAY, the held stream
// finishes, the connection closes) gets the freed connection slot and
// goes out on a new connection, as does one sent after the GOAWAY; each
// reaches the app once.
func TestH2PendingAcrossGoAway(t *testing.T) {
	ca := newTestCA(t)
	app := &tokenApp{arrived: make(chan string, 8), token: make(chan struct{})}
	t.Cleanup(func() { close(app.token) })
	addr, serve := replaceablePeer(t, ca, 1, app)
	old := serve()
	cli := h2Client(t, ca, addr, &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 4})
	url := "http://" + cli.Addr("upstream:server") + "/hold"
	cl := cli.state.Load().clusters["server"]

	first := getAsync(url, "1")
	<-app.arrived
	second := getAsync(url, "2")
	waitFor(t, "the second request pending", func() bool { return cl.conns.pending.Load() == 1 })
	serve() // takes the connections from now on
	shut := make(chan error, 1)
	go func() { shut <- old.Shutdown(t.Context()) }()
	third := getAsync(url, "3")
	waitFor(t, "the third request pending", func() bool { return cl.conns.pending.Load() == 2 })
	app.token <- struct{}{}
	if r := <-first; r.err != nil || r.code != 200 {
		t.Fatalf("first request: %+v, want 200", r)
	}
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	got := map[string]bool{}
	for range 2 {
		select {
		case id := <-app.arrived:
			got[id] = true
		case <-time.After(5 * time.Second):
			t.Fatalf("pending requests never reached the new connection (arrived: %v)", got)
		}
		app.token <- struct{}{}
	}
	for i, ch := range []<-chan result{second, third} {
		if r := <-ch; r.err != nil || r.code != 200 {
			t.Fatalf("request %d: %+v, want 200", i+2, r)
		}
	}
	if !got["2"] || !got["3"] {
		t.Fatalf("arrived after the GOAWAY: %v, want 2 and 3", got)
	}
	select {
	case id := <-app.arrived:
		t.Fatalf("request %s reached the app again", id)
	default:
	}
}

// TestH2StreamFreedByResetOrCancel: toward a peer allowing one stream,
// with max_connections 1, a pending request gets the stream when the
// peer resets the one before it (RST_STREAM), and the next gets it when
// the client of the one before goes away mid-answer (the proxy resets
// the stream, CANCEL).
func TestH2StreamFreedByResetOrCancel(t *testing.T) {
	ca := newTestCA(t)
	app := &tokenApp{arrived: make(chan string, 4), token: make(chan struct{})}
	cli := h2Client(t, ca, serveH2Peer(t, ca, 1, app), &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1})
	t.Cleanup(func() { close(app.token) })
	base := "http://" + cli.Addr("upstream:server")
	cl := cli.state.Load().clusters["server"]
	arrives := func(want string) {
		t.Helper()
		select {
		case id := <-app.arrived:
			if id != want {
				t.Fatalf("arrived %q, want %q", id, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("request %s never reached the app", want)
		}
	}

	aborted := getAsync(base+"/abort", "1")
	arrives("1")
	// The second goes straight through the cluster's pool, so that the
	// test closes its answer's body as the proxy does.
	streamed := make(chan *http.Response, 1)
	go func() {
		req, _ := http.NewRequest("GET", "https://"+cl.eps[0].addr+"/stream", nil)
		req.Header.Set("X-Id", "2")
		resp, err := cl.transport.RoundTrip(req)
		if err != nil {
			t.Errorf("streamed request: %v", err)
		}
		streamed <- resp
	}()
	waitFor(t, "the second request pending", func() bool { return cl.conns.pending.Load() == 1 })
	app.token <- struct{}{}
	if r := <-aborted; r.err != nil || r.code < 500 {
		t.Fatalf("reset request: %+v, want a 5xx", r)
	}
	arrives("2")
	last := getAsync(base+"/hold", "3")
	waitFor(t, "the third request pending", func() bool { return cl.conns.pending.Load() == 1 })
	resp := <-streamed
	if resp == nil {
		t.FailNow()
	}
	resp.Body.Close() // before its end: the stream is reset
	arrives("3")
	app.token <- struct{}{}
	if r := <-last; r.err != nil || r.code != 200 {
		t.Fatalf("third request: %+v, want 200", r)
	}
	if got := cl.openConns(); got != 1 {
		t.Fatalf("%d upstream connections open, want 1", got)
	}
}

// TestH2DrainingPeerExactlyOnce: requests racing a peer's graceful
// shutdown (its GOAWAY: streams beyond the last it took are not
// processed, and the connection takes no new one) while a new server
// takes its address: every one is answered 200 and reached an app
// exactly once, those the old server did not process being sent again
// on a new connection.
func TestH2DrainingPeerExactlyOnce(t *testing.T) {
	ca := newTestCA(t)
	app := &countApp{seen: map[string]int{}}
	addr, serve := replaceablePeer(t, ca, 4, app)
	old := serve()
	cli := h2Client(t, ca, addr, &CircuitBreakers{MaxConnections: 2, MaxPendingRequests: 64})
	url := "http://" + cli.Addr("upstream:server") + "/"
	const n = 64
	rs := make([]<-chan result, n)
	for i := range rs {
		rs[i] = getAsync(url, strconv.Itoa(i))
		if i == n/4 {
			serve()
			go old.Shutdown(t.Context())
		}
	}
	for i, ch := range rs {
		r := <-ch
		app.mu.Lock()
		seen := app.seen[strconv.Itoa(i)]
		app.mu.Unlock()
		if r.err != nil || r.code != 200 || seen != 1 {
			t.Errorf("request %d: %+v, reached the app %d times", i, r, seen)
		}
	}
}

// serveFramerPeer is an HTTP/2 peer over mTLS written with x/net's
// framer: for each connection it reads the client preface, sends its
// SETTINGS and hands the framer to serve with the connection's number,
// from 0, closing the connection when serve returns.
func serveFramerPeer(t *testing.T, ca *testCA, serve func(n int, c net.Conn, fr *http2.Framer)) string {
	t.Helper()
	src := ca.source(t, "/ns/demo/sa/server")
	cfg := svidtls.ServerConfig(src, src, svidtls.AuthorizeMemberOf(td), clockwork.NewRealClock())
	cfg.NextProtos = []string{"h2"}
	l, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for n := 0; ; n++ {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := io.ReadFull(c, make([]byte, len(http2.ClientPreface))); err != nil {
					return
				}
				fr := http2.NewFramer(c, c)
				if fr.WriteSettings() != nil {
					return
				}
				serve(n, c, fr)
			}()
		}
	}()
	return l.Addr().String()
}

// headerValue returns the value of the header field name, or "".
func headerValue(fs []hpack.HeaderField, name string) string {
	for _, hf := range fs {
		if hf.Name == name {
			return hf.Value
		}
	}
	return ""
}

// answerOK answers stream id 200 "ok".
func answerOK(fr *http2.Framer, id uint32) {
	var hb bytes.Buffer
	hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
	fr.WriteData(id, true, []byte("ok"))
}

// serveRefusingPeer is an HTTP/2 peer that turns down the first stream
// of each value of the X-Refuse header, unprocessed, and answers every
// other one 200. It turns a stream down with REFUSED_STREAM, or, if
// goAway, with a graceful GOAWAY whose last stream is below it. It
// records the X-Refuse values of the streams it answered.
func serveRefusingPeer(t *testing.T, ca *testCA, goAway bool) (string, func() []string) {
	t.Helper()
	var mu sync.Mutex
	refused := map[string]bool{}
	var served []string
	addr := serveFramerPeer(t, ca, func(_ int, _ net.Conn, fr *http2.Framer) {
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fr.WriteSettingsAck()
				}
			case *http2.MetaHeadersFrame:
				v := headerValue(f.Fields, "x-refuse")
				mu.Lock()
				refuse := !refused[v]
				refused[v] = true
				if !refuse {
					served = append(served, v)
				}
				mu.Unlock()
				switch {
				case !refuse:
					answerOK(fr, f.StreamID)
				case goAway:
					// The connection takes no more streams: the
					// client dials another.
					fr.WriteGoAway(f.StreamID-1, http2.ErrCodeNo, nil)
				default:
					fr.WriteRSTStream(f.StreamID, http2.ErrCodeRefusedStream)
				}
			}
		}
	})
	return addr, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(served)
	}
}

// TestH2RefusedStreamSentAgain: a stream the peer did not process is
// sent again by the HTTP/2 pool, as net/http's Transport does, when its
// body allows: one without a body or with GetBody is, one whose body
// cannot be read again is not. The peer turns the stream down with
// REFUSED_STREAM, or with a graceful GOAWAY whose last stream is below
// it (net/http reports each by a text of its own).
func TestH2RefusedStreamSentAgain(t *testing.T) {
	for _, tc := range []struct {
		name    string
		goAway  bool
		errText string
	}{
		{"REFUSED_STREAM", false, "REFUSED_STREAM"},
		{"GOAWAY", true, "graceful shutdown GOAWAY"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca := newTestCA(t)
			addr, served := serveRefusingPeer(t, ca, tc.goAway)
			cli := h2Client(t, ca, addr, nil)
			pool := cli.state.Load().clusters["server"].transport
			do := func(refuse string, body io.Reader, getBody bool) error {
				req, _ := http.NewRequest("POST", "https://"+addr+"/", body)
				if !getBody {
					req.GetBody = nil
				}
				req.Header.Set("X-Refuse", refuse)
				resp, err := pool.RoundTrip(req)
				if err != nil {
					return err
				}
				defer resp.Body.Close()
				if b, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || string(b) != "ok" {
					return fmt.Errorf("answer %d %q", resp.StatusCode, b)
				}
				return nil
			}
			if err := do("none", nil, false); err != nil {
				t.Fatalf("without a body: %v", err)
			}
			if err := do("replayable", strings.NewReader("body"), true); err != nil {
				t.Fatalf("with GetBody: %v", err)
			}
			if err := do("once", io.NopCloser(strings.NewReader("body")), false); err == nil || !strings.Contains(err.Error(), tc.errText) {
				t.Fatalf("with a body read once: %v, want the refusal", err)
			}
			if got, want := served(), []string{"none", "replayable"}; !slices.Equal(got, want) {
				t.Fatalf("served %v, want %v", got, want)
			}
		})
	}
}

// TestH2PeerClosedIdleConnection: a pooled connection the peer closes
// while idle (no stream, so no state hook runs) frees its slot and
// leaves the pool; the next request dials a new one.
func TestH2PeerClosedIdleConnection(t *testing.T) {
	ca := newTestCA(t)
	app := &countApp{seen: map[string]int{}}
	addr, serve := replaceablePeer(t, ca, 0, app)
	old := serve()
	cli := h2Client(t, ca, addr, &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 1})
	url := "http://" + cli.Addr("upstream:server") + "/"
	cl := cli.state.Load().clusters["server"]
	if r := <-getAsync(url, "1"); r.code != 200 {
		t.Fatalf("first request: %+v", r)
	}
	serve()
	old.Close()
	waitFor(t, "the closed connection's slot freed", func() bool { return cl.openConns() == 0 })
	if r := <-getAsync(url, "2"); r.code != 200 {
		t.Fatalf("request after the close: %+v", r)
	}
	cl.transport.mu.Lock()
	n := len(cl.transport.conns[addr])
	cl.transport.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d connections pooled, want 1", n)
	}
}

// TestH2GoAwayAfterReserveSentAgain: a request whose stream was
// reserved on a connection that then gets a graceful GOAWAY, before the
// request's HEADERS went out, is found unusable by net/http and sent on
// a new connection; the stream the GOAWAY kept is answered on the old
// one. The peer holds the reserved request back by not reading the
// HEADERS of the one before it, which are too large for the socket
// buffers: net/http sends a connection's HEADERS one at a time.
func TestH2GoAwayAfterReserveSentAgain(t *testing.T) {
	ca := newTestCA(t)
	held := make(chan uint32, 1) // the large HEADERS began on this stream
	goAway, resume := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	arrived := map[int][]string{} // X-Ids by connection
	addr := serveFramerPeer(t, ca, func(n int, c net.Conn, fr *http2.Framer) {
		dec := hpack.NewDecoder(4096, nil)
		var block []byte
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			var end bool
			var id uint32
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fr.WriteSettingsAck()
				}
				continue
			case *http2.HeadersFrame:
				block = append(block[:0], f.HeaderBlockFragment()...)
				end, id = f.HeadersEnded(), f.StreamID
				if !end && n == 0 {
					held <- id
					<-goAway
					fr.WriteGoAway(id, http2.ErrCodeNo, nil)
					<-resume
				}
			case *http2.ContinuationFrame:
				block = append(block, f.HeaderBlockFragment()...)
				end, id = f.HeadersEnded(), f.StreamID
			default:
				continue
			}
			if !end {
				continue
			}
			fs, err := dec.DecodeFull(block)
			if err != nil {
				t.Errorf("peer: %v", err)
				return
			}
			mu.Lock()
			arrived[n] = append(arrived[n], headerValue(fs, "x-id"))
			mu.Unlock()
			answerOK(fr, id)
		}
	})
	cli := h2Client(t, ca, addr, nil)
	pool := cli.state.Load().clusters["server"].transport
	// The request sent again has a body: ClientConn.RoundTrip closed
	// the first one, unread, so the pool must take a new one.
	var bodies atomic.Int32
	send := func(id string, big bool) <-chan error {
		ch := make(chan error, 1)
		go func() {
			req, _ := http.NewRequest("GET", "https://"+addr+"/", nil)
			if id == "reserved" {
				req, _ = http.NewRequest("POST", "https://"+addr+"/", &closingBody{r: strings.NewReader("payload")})
				req.GetBody = func() (io.ReadCloser, error) {
					bodies.Add(1)
					return &closingBody{r: strings.NewReader("payload")}, nil
				}
			}
			req.Header.Set("X-Id", id)
			if big {
				req.Header.Set("X-Big", strings.Repeat("a", 16<<20))
			}
			resp, err := pool.RoundTrip(req)
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(b) != "ok" {
					err = fmt.Errorf("answer %d %q", resp.StatusCode, b)
				}
			}
			ch <- err
		}()
		return ch
	}
	if err := <-send("first", false); err != nil {
		t.Fatalf("first request: %v", err)
	}
	conn := func() *http.ClientConn {
		pool.mu.Lock()
		defer pool.mu.Unlock()
		return pool.conns[addr][0].cc
	}()
	large := send("large", true)
	select {
	case <-held:
	case <-time.After(5 * time.Second):
		t.Fatal("the large request never began")
	}
	reserved := send("reserved", false)
	// Its own stream and the large one's.
	waitFor(t, "the second request's stream reserved", func() bool { return conn.InFlight() == 2 })
	close(goAway)
	waitFor(t, "the GOAWAY seen", func() bool { return conn.Available() == 0 })
	close(resume)
	for what, ch := range map[string]<-chan error{"large": large, "reserved": reserved} {
		select {
		case err := <-ch:
			if err != nil {
				t.Errorf("%s request: %v", what, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s request never answered", what)
		}
	}
	if got := bodies.Load(); got != 1 {
		t.Errorf("the request sent again took %d new bodies, want 1", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if got, want := arrived[0], []string{"first", "large"}; !slices.Equal(got, want) {
		t.Errorf("arrived on the first connection: %v, want %v", got, want)
	}
	if got, want := arrived[1], []string{"reserved"}; !slices.Equal(got, want) {
		t.Errorf("arrived on the second connection: %v, want %v", got, want)
	}
}

// TestH2PendingBehindDial: requests waiting for a connection being
// dialled count as pending requests, as in Envoy: with max_connections
// 1 and max_pending_requests 2, while the peer has not yet accepted the
// one connection, the request that dials it and one more wait, and a
// third is refused at once with 503 and x-envoy-overloaded. Once the
// peer answers, both waiting requests are served, once each.
func TestH2PendingBehindDial(t *testing.T) {
	ca := newTestCA(t)
	src := ca.source(t, "/ns/demo/sa/server")
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	app := &countApp{seen: map[string]int{}}
	srv := h2PeerServer(t, src, 4, app)
	t.Cleanup(func() { raw.Close() })
	cli := h2Client(t, ca, raw.Addr().String(), &CircuitBreakers{MaxConnections: 1, MaxPendingRequests: 2})
	url := "http://" + cli.Addr("upstream:server") + "/"
	cl := cli.state.Load().clusters["server"]

	// The TCP connection is made, but nothing accepts it: its TLS
	// handshake waits.
	first := getAsync(url, "1")
	waitFor(t, "the first request pending for its dial", func() bool { return cl.conns.pending.Load() == 1 })
	second := getAsync(url, "2")
	waitFor(t, "the second request pending for the dial", func() bool { return cl.conns.pending.Load() == 2 })
	select {
	case r := <-getAsync(url, "3"):
		if r.err != nil || r.code != http.StatusServiceUnavailable || r.overloaded != "true" {
			t.Fatalf("third request with two pending: %+v, want 503 with x-envoy-overloaded", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the third request waited behind the dial")
	}
	go srv.ServeTLS(raw, "", "")
	for i, ch := range []<-chan result{first, second} {
		if r := <-ch; r.err != nil || r.code != 200 {
			t.Fatalf("request %d: %+v, want 200", i+1, r)
		}
	}
	app.mu.Lock()
	defer app.mu.Unlock()
	if app.seen["1"] != 1 || app.seen["2"] != 1 || app.seen["3"] != 0 {
		t.Fatalf("requests reached the app: %v, want 1 and 2 once", app.seen)
	}
	if got := counter(t, cli.metrics.overflows.WithLabelValues("server", "max_pending_requests")); got != 1 {
		t.Fatalf("pending overflows = %v, want 1", got)
	}
	if got := cl.conns.pending.Load(); got != 0 {
		t.Fatalf("%d requests still counted as pending", got)
	}
}

// closingBody is a request body whose reads fail once it is closed, as
// a server request's body does once its handler is done with it.
type closingBody struct {
	mu     sync.Mutex
	r      io.Reader
	closed bool
}

func (b *closingBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, errors.New("read after close")
	}
	return b.r.Read(p)
}

func (b *closingBody) Close() error {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	return nil
}
