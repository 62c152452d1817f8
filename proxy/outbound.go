package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var (
	errNoRoute    = errors.New("no route")
	errNoEndpoint = errors.New("no endpoint")
)

// defaultRouteTimeout is Envoy's default request timeout.
const defaultRouteTimeout = 15 * time.Second

// maxRetryBody bounds the request body kept for replay on retry; a larger
// or unsized body is sent once.
const maxRetryBody = 64 << 10

// outboundListener is a local plaintext port of the application's.
type outboundListener struct {
	p   *Proxy
	cfg Outbound
	ln  net.Listener
	srv *http.Server
	fwd *forwarder
	ctx context.Context
	end context.CancelFunc
	// mirrors holds a token per mirrored request in flight.
	mirrors chan struct{}
	// h1 serves HTTP/1.1 connections; httpLn feeds the rest to srv.
	h1     *h1Server
	httpLn *connListener
}

// handedOff marks a captured connection given to the HTTP server, which
// logs its requests instead.
const handedOff = -1

// capturedKey carries a captured connection's cluster into its requests.
type capturedKey struct{}

// peekedConn is a connection whose first bytes were read to tell HTTP
// from other protocols; reads drain them first.
type peekedConn struct {
	net.Conn
	r       *bufio.Reader
	cluster string
}

func (c *peekedConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func (c *peekedConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// sniffWait bounds the wait for a client's first bytes: protocols where
// the server speaks first send none, and are spliced after it.
const sniffWait = 200 * time.Millisecond

// sniffHTTP tells whether c starts with an HTTP/1 request line or the
// HTTP/2 preface.
func sniffHTTP(c net.Conn, cluster string) (*peekedConn, bool) {
	pc := &peekedConn{Conn: c, r: bufio.NewReaderSize(c, 4096), cluster: cluster}
	_ = c.SetReadDeadline(time.Now().Add(sniffWait))
	b, _ := pc.r.Peek(4)
	_ = c.SetReadDeadline(time.Time{})
	for _, m := range []string{"GET ", "POST", "PUT ", "HEAD", "DELE", "OPTI", "PATC", "PRI "} {
		if string(b) == m {
			return pc, true
		}
	}
	return pc, false
}

// targetKey carries a request's chosen route and cluster to the transport.
type targetKey struct{}

type target struct {
	route   *Route
	cluster *cluster
	source  string // the client's address, for HashSource
}

// targetCtx carries a target without a separate context.WithValue.
type targetCtx struct {
	context.Context
	t target
}

func (c *targetCtx) Value(key any) any {
	if key == (targetKey{}) {
		return &c.t
	}
	return c.Context.Value(key)
}

func (p *Proxy) newOutbound(cfg Outbound) (*outboundListener, error) {
	ln, err := net.Listen("tcp", cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("outbound %s: %w", cfg.Name, err)
	}
	l := &outboundListener{p: p, cfg: cfg, ln: ln, mirrors: make(chan struct{}, maxMirrors)}
	l.ctx, l.end = context.WithCancel(context.Background())
	if cfg.Protocol == "tcp" {
		return l, nil
	}
	l.httpLn = newConnListener(ln.Addr())
	// The Host header stays the client's: ReverseProxy's Rewrite keeps
	// it (only SetURL clears it), and so does the fast path.
	l.fwd = newForwarder(roundTripper{p}, "https", "")
	l.srv = &http.Server{
		Handler:           l,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if pc, ok := c.(*peekedConn); ok {
				return context.WithValue(ctx, capturedKey{}, pc.cluster)
			}
			return ctx
		},
	}
	// The app may speak HTTP/1.1 or HTTP/2 with prior knowledge (gRPC).
	l.srv.Protocols = new(http.Protocols)
	l.srv.Protocols.SetHTTP1(true)
	l.srv.Protocols.SetUnencryptedHTTP2(true)
	l.h1 = newH1Server(l, l.httpLn, func(c net.Conn) context.Context {
		if pc, ok := c.(*peekedConn); ok {
			return context.WithValue(context.Background(), capturedKey{}, pc.cluster)
		}
		return context.Background()
	})
	l.h1.logPanic = func(v any) { p.log.Error("http handler panic", "listener", cfg.Name, "panic", fmt.Sprint(v)) }
	l.h1.watchAfter, l.h1.gone = p.watchAfter, p.metrics.downstreamGone.WithLabelValues("outbound")
	return l, nil
}

func (l *outboundListener) serve() error {
	if l.srv != nil {
		go func() { _ = l.srv.Serve(l.httpLn) }()
	}
	return l.p.acceptLoop(l.ln, "outbound", l.cfg.Name, func(c net.Conn) {
		if l.cfg.Protocol == "tcp" || l.cfg.Protocol == "transparent" {
			l.serveTCP(c)
		} else {
			l.h1.serveConn(c)
		}
	})
}

func (l *outboundListener) shutdown(ctx context.Context) {
	l.end()
	l.ln.Close()
	if l.srv == nil {
		return
	}
	l.h1.shutdown(ctx)
	if err := l.srv.Shutdown(ctx); err != nil {
		l.srv.Close()
	}
}

// ServeHTTP routes a request from the app to a peer sidecar.
func (l *outboundListener) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := l.p.clock.Now()
	st := l.p.state.Load()
	rw := newRecorder(w)
	defer rw.release()
	me := l.p.self()
	res := reqLog{direction: "outbound", method: r.Method, path: r.URL.Path, proto: r.Proto,
		source: me.s, srcNS: me.ns, srcWL: me.wl, authz: authzNone}
	res.span = startSpan(r.Header, l.p.sampler)
	res.traceID = res.span.traceID
	// The app speaks for itself only through its SVID: identity headers
	// it sets are not forwarded.
	stripIdentityHeaders(r.Header)
	var rt *Route
	switch {
	case r.Method == http.MethodConnect: // no tunnels through the proxy port
	case l.cfg.Protocol == "transparent":
		// Captured HTTP goes to the cluster of its original destination.
		name, _ := r.Context().Value(capturedKey{}).(string)
		rt = st.captured[name]
	default:
		rt = st.route(l.cfg.Route, r.Host, r.Method, r.URL.Path, r.Header)
	}
	if rt == nil {
		proxyError(rw, r, errNoRoute)
	} else {
		cl := st.clusters[pickCluster(rt)]
		res.dest = cl.cfg.Name
		l.forward(rw, r, rt, cl)
	}
	res.status, res.bytes, res.dur = rw.status(), rw.n, l.p.clock.Since(start)
	l.p.observe(&res)
}

// forward applies the route's faults and the cluster's circuit breaker,
// then proxies within the route's timeout.
func (l *outboundListener) forward(w http.ResponseWriter, r *http.Request, rt *Route, cl *cluster) {
	if f := rt.Fault; f != nil {
		if f.DelayPercent > 0 && rand.Float64()*100 < f.DelayPercent {
			l.p.metrics.faults.WithLabelValues("delay").Inc()
			select {
			case <-l.p.clock.After(time.Duration(f.Delay)):
			case <-r.Context().Done():
				return
			}
		}
		if f.AbortPercent > 0 && rand.Float64()*100 < f.AbortPercent {
			l.p.metrics.faults.WithLabelValues("abort").Inc()
			if f.AbortGRPCStatus != 0 {
				// Trailers-only, as a gRPC server answers a call it
				// refuses: HTTP 200 with the status in the headers.
				w.Header().Set("Content-Type", "application/grpc")
				w.Header().Set("Grpc-Status", strconv.Itoa(f.AbortGRPCStatus))
				w.Header().Set("Grpc-Message", "fault filter abort")
				w.WriteHeader(http.StatusOK)
				return
			}
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.WriteHeader(f.AbortStatus)
			_, _ = io.WriteString(w, "fault filter abort\n")
			return
		}
	}
	if cl.inflight.Add(1) > cl.maxReq {
		cl.inflight.Add(-1)
		l.p.metrics.overflows.WithLabelValues(cl.cfg.Name, "max_requests").Inc()
		overloaded(w)
		return
	}
	defer cl.inflight.Add(-1)
	timeout := time.Duration(rt.Timeout)
	if timeout <= 0 {
		timeout = defaultRouteTimeout
	}
	if m := rt.Mirror; m != nil && m.Percent > 0 && rand.Float64()*100 < m.Percent {
		l.mirror(r, m, timeout)
	}
	tg := target{route: rt, cluster: cl, source: r.RemoteAddr}
	var ctx context.Context
	var cancel func()
	if down, ok := r.Context().(*downCtx); ok || r.Context().Done() == nil {
		// The fast server's requests are cancelled only when their
		// client goes away, which interrupts their exchange itself:
		// the deadline is all there is to enforce.
		rc := &routeCtx{targetCtx: targetCtx{Context: r.Context(), t: tg}, deadline: time.Now().Add(timeout), down: down}
		ctx, cancel = rc, rc.end
	} else {
		ctx, cancel = context.WithTimeout(&targetCtx{Context: r.Context(), t: tg}, timeout)
	}
	// Deferred: ReverseProxy ends a copy its client left by panicking
	// (ErrAbortHandler), and a routeCtx's timer would then run on to
	// the route's deadline.
	defer cancel()
	// HTTP/2 clusters stream through ReverseProxy (1xx answers included).
	l.fwd.serve(ctx, w, r, !cl.cfg.HTTP2)
}

// routeCtx is a request's context under a route whose parent can never
// be cancelled, or only when its client goes away (a downCtx, which then
// interrupts the exchange itself): context.WithTimeout's, with its timer and cancellation
// made only once something asks for Done. The synchronous HTTP/1.1
// transport asks for the deadline instead (onlyDeadline) and sets it on
// the connection, which spares each request a runtime timer started and
// stopped (a timer that becomes a processor's earliest wakes an idle
// thread), the cancel context and the context.AfterFunc registered on
// it: three allocations and two locks each.
type routeCtx struct {
	targetCtx
	deadline time.Time
	// down is the parent when it is the fast server's connection
	// context, which ends only by interrupting the exchange registered
	// with it (onlyDeadline's caller registers there).
	down  *downCtx
	mu    sync.Mutex
	lazy  atomic.Pointer[lazyCtx] // set once, under mu
	ended bool
}

type lazyCtx struct {
	ctx    context.Context
	cancel context.CancelFunc
}

func (c *routeCtx) Deadline() (time.Time, bool) { return c.deadline, true }

func (c *routeCtx) Done() <-chan struct{} {
	if l := c.lazy.Load(); l != nil {
		return l.ctx.Done()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.lazy.Load()
	if l == nil {
		l = &lazyCtx{}
		l.ctx, l.cancel = context.WithDeadline(&c.targetCtx, c.deadline)
		if c.ended {
			l.cancel()
		}
		c.lazy.Store(l)
	}
	return l.ctx.Done()
}

func (c *routeCtx) Err() error {
	if l := c.lazy.Load(); l != nil {
		return l.ctx.Err()
	}
	c.mu.Lock()
	ended := c.ended
	c.mu.Unlock()
	switch {
	case ended:
		return context.Canceled
	case c.down != nil && c.down.Err() != nil:
		return context.Canceled
	case !time.Now().Before(c.deadline):
		return context.DeadlineExceeded
	}
	return nil
}

// Value answers from the made context once there is one: context's own
// look-ups (a child attaching to its parent) find its cancelCtx there.
func (c *routeCtx) Value(key any) any {
	if l := c.lazy.Load(); l != nil {
		return l.ctx.Value(key)
	}
	return c.targetCtx.Value(key)
}

// onlyDeadline reports the deadline while nothing waits on Done: until
// the request ends, the deadline is then the only way the context can
// end, and the caller may enforce it itself.
func (c *routeCtx) onlyDeadline() (time.Time, bool) {
	return c.deadline, c.lazy.Load() == nil
}

func (c *routeCtx) downstream() *downCtx { return c.down }

func (c *routeCtx) end() {
	c.mu.Lock()
	c.ended = true
	l := c.lazy.Load()
	c.mu.Unlock()
	if l != nil {
		l.cancel()
	}
}

// maxMirrors bounds the mirrored requests in flight per listener; beyond
// it copies are dropped rather than queued.
const maxMirrors = 64

// mirror sends a copy of r to the mirror cluster in the background. A body
// of known length (up to maxRetryBody) is read into memory and replayed to
// both. A body of unknown length (gRPC calls, chunked uploads) is copied as
// the original streams it, and the copy goes out once that body has ended
// within the bound: the original never waits for the mirror.
func (l *outboundListener) mirror(r *http.Request, m *Mirror, timeout time.Duration) {
	cl := l.p.state.Load().clusters[m.Cluster]
	if cl == nil {
		return
	}
	var body []byte
	streamed := false
	if r.Body != nil && r.Body != http.NoBody {
		switch {
		case r.ContentLength > maxRetryBody:
			l.p.metrics.mirrors.WithLabelValues(m.Cluster, "too_large").Inc()
			return
		case r.ContentLength < 0:
			streamed = true
		default:
			b, err := io.ReadAll(io.LimitReader(r.Body, maxRetryBody+1))
			if err != nil || len(b) > maxRetryBody {
				return
			}
			body = b
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
	}
	// The copy's headers are taken now, before forwarding may rewrite
	// the original's.
	out := r.Clone(context.WithoutCancel(r.Context()))
	out.RequestURI = ""
	out.URL.Scheme = "https"
	out.Host = hostWithoutPort(r.Host) + "-shadow"
	out.Close = false
	send := func(body []byte) {
		select {
		case l.mirrors <- struct{}{}:
		default:
			l.p.metrics.mirrors.WithLabelValues(m.Cluster, "dropped").Inc()
			return
		}
		ctx, cancel := context.WithTimeout(out.Context(), timeout)
		out = out.WithContext(ctx)
		out.Body = http.NoBody
		if body != nil {
			out.Body = io.NopCloser(bytes.NewReader(body))
			out.ContentLength = int64(len(body))
		}
		go func() {
			defer func() { <-l.mirrors }()
			defer cancel()
			result := "error"
			if ep := cl.pick(nil, l.p.clock.Now().UnixNano()); ep != nil {
				out.URL.Host = ep.addr
				if resp, err := cl.transportFor(out).RoundTrip(out); err == nil {
					_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
					resp.Body.Close()
					result = codeLabel(resp.StatusCode)
				}
			}
			l.p.metrics.mirrors.WithLabelValues(m.Cluster, result).Inc()
		}()
	}
	if !streamed {
		send(body)
		return
	}
	r.Body = &mirrorTee{ReadCloser: r.Body, done: send, tooLarge: func() {
		l.p.metrics.mirrors.WithLabelValues(m.Cluster, "too_large").Inc()
	}}
}

// mirrorTee keeps a copy of a streamed request body, up to maxRetryBody,
// and hands it to done when the body ends cleanly. A body that outgrows
// the bound is forwarded untouched and not mirrored; one that fails or is
// abandoned before its end is not mirrored either.
type mirrorTee struct {
	io.ReadCloser
	buf      []byte
	over     bool
	fired    bool
	done     func([]byte)
	tooLarge func()
}

func (t *mirrorTee) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if !t.over && !t.fired {
		if len(t.buf)+n > maxRetryBody {
			t.over, t.buf = true, nil
			t.tooLarge()
		} else {
			t.buf = append(t.buf, p[:n]...)
		}
	}
	if err == io.EOF && !t.over && !t.fired {
		t.fired = true
		t.done(t.buf)
	}
	return n, err
}

func hostWithoutPort(h string) string {
	if i := strings.LastIndexByte(h, ':'); i >= 0 && !strings.HasSuffix(h, "]") {
		return h[:i]
	}
	return h
}

// roundTripper sends a request to the chosen cluster: it picks an
// endpoint, bounds each try, and retries as the route says.
type roundTripper struct{ p *Proxy }

func (t roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	return t.roundTrip(req, nil)
}

// roundTrip is RoundTrip. first, when not nil, is req's own allocation,
// made by a caller that hands req over (the forwarder, which reads only
// the context and the header of req once it is sent): the first try
// without a per-try timeout uses it as its request instead of a copy.
// Later tries copy req as usual; it is only read from then on, so a
// transport still holding the first try's request sees no change.
func (t roundTripper) roundTrip(req *http.Request, first *tryReq) (*http.Response, error) {
	tg, _ := req.Context().Value(targetKey{}).(*target)
	if tg == nil {
		return nil, errNoRoute
	}
	cl, rp := tg.cluster, tg.route.Retry
	attempts := 1
	var perTry time.Duration
	if rp != nil {
		attempts += rp.NumRetries
		perTry = time.Duration(rp.PerTryTimeout)
	}
	var body *retryBuf
	var rec *recordedBody
	if attempts > 1 && req.Body != nil && req.Body != http.NoBody {
		switch {
		case req.ContentLength > maxRetryBody:
			attempts = 1
		case req.ContentLength < 0:
			// An unsized body (gRPC, chunked) streams as it comes and is
			// never waited for: a stream may need the answer before it
			// ends. It is recorded on the way; a try is retried only if
			// the whole body had been read by then.
			rec = &recordedBody{r: req.Body}
		default:
			b, err := readRetryBody(req.Body, req.ContentLength)
			if err != nil {
				return nil, fmt.Errorf("read request body: %w", err)
			}
			body = b
		}
	}
	if body != nil {
		// RoundTrip's own hold: the tries' bodies hold the rest.
		defer body.release()
	}
	var last *endpoint
	for try := 0; ; try++ {
		if try > 0 {
			t.p.metrics.retries.WithLabelValues(cl.cfg.Name).Inc()
			if try == 1 {
				// This request counts as one retry in progress until
				// its last try has answered.
				cl.retrying.Add(1)
				defer cl.retrying.Add(-1)
			}
			select {
			case <-t.p.clock.After(backoff(rp, try)):
			case <-req.Context().Done():
				return nil, req.Context().Err()
			}
		}
		var ep *endpoint
		if hk := tg.route.HashHeader; hk != "" && cl.ring != nil && req.Header.Get(hk) != "" {
			ep = cl.pickHash(hashKey(req.Header.Get(hk)), last, t.p.clock.Now().UnixNano())
		} else if host, _, err := net.SplitHostPort(tg.source); tg.route.HashSource && cl.ring != nil && err == nil {
			ep = cl.pickHash(hashKey(host), last, t.p.clock.Now().UnixNano())
		} else {
			ep = cl.pick(last, t.p.clock.Now().UnixNano())
		}
		if ep == nil {
			return nil, errNoEndpoint
		}
		last = ep
		ctx, cancel := req.Context(), context.CancelFunc(nil)
		var out *http.Request
		var replay *tryBody
		var done *doneBody
		if perTry > 0 {
			ctx, cancel = context.WithTimeout(ctx, perTry)
			out = req.WithContext(ctx)
			u := *req.URL
			out.URL = &u
			if body != nil {
				replay = new(tryBody)
			}
		} else {
			// The same context: the request, its URL, its body's
			// reader and the response's closer copied or made in one
			// allocation.
			tr := first
			if try > 0 || tr == nil || req != &tr.req || req.URL != &tr.url {
				tr = &tryReq{fwdReq: fwdReq{req: *req, url: *req.URL}}
			}
			out = &tr.req
			out.URL = &tr.url
			replay = &tr.body
			done = &tr.done
		}
		out.URL.Host = ep.addr
		if body != nil {
			replay.open(body)
			out.Body = replay
		} else if rec != nil {
			out.Body = rec
		}
		ep.active.Add(1)
		resp, err := cl.transportFor(out).RoundTrip(out)
		cl.outcome(ep, tryStatus(resp, err, out), t.p.clock.Now().UnixNano())
		if err != nil && errors.Is(err, errOverflow) {
			// Envoy never retries an overflow: the cluster is full.
			if cancel != nil {
				cancel()
			}
			ep.active.Add(-1)
			return nil, err
		}
		// The last try, a finished request, or a retry budget spent.
		final := try == attempts-1 || req.Context().Err() != nil || (try == 0 && cl.retrying.Load() >= cl.retryCap())
		if !final && rec != nil && body == nil {
			b, whole := rec.complete()
			final = !whole
			if whole {
				body = &retryBuf{b: b}
				body.refs.Store(1) // not pooled: release only counts
				defer body.release()
			}
		}
		if err == nil && (final || !retryStatus(rp, resp)) {
			if done == nil {
				done = new(doneBody)
			}
			done.ReadCloser, done.cancel, done.ep = resp.Body, cancel, ep
			resp.Body = done
			return resp, nil
		}
		if resp != nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
		}
		if cancel != nil {
			cancel()
		}
		ep.active.Add(-1)
		if err != nil && (final || !retryError(rp, err)) {
			if ctx.Err() != nil && req.Context().Err() == nil {
				err = fmt.Errorf("per-try timeout: %w", context.DeadlineExceeded)
			}
			return nil, err
		}
	}
}

// backoff is Envoy's: full jitter below base*2^(try-1), capped at max
// (default 10×base; base defaults to 25 ms).
func backoff(rp *RetryPolicy, try int) time.Duration {
	base := time.Duration(rp.BaseInterval)
	if base <= 0 {
		base = 25 * time.Millisecond
	}
	max := time.Duration(rp.MaxInterval)
	if max <= 0 {
		max = 10 * base
	}
	d := base << min(try-1, 20)
	if d > max || d <= 0 {
		d = max
	}
	return time.Duration(rand.Int64N(int64(d)) + 1)
}

// grpcRetryCodes are Envoy's gRPC retry conditions and the grpc-status
// each retries on.
var grpcRetryCodes = map[string]string{"cancelled": "1", "deadline-exceeded": "4", "resource-exhausted": "8", "internal": "13", "unavailable": "14"}

// retryStatus says whether resp is one rp retries. gRPC conditions look
// at grpc-status in the response headers, where a call that failed
// before any message (a trailers-only response) carries it; as in Envoy,
// a status in trailers comes too late to retry.
func retryStatus(rp *RetryPolicy, resp *http.Response) bool {
	status := resp.StatusCode
	for _, on := range rp.RetryOn {
		switch on {
		case "5xx":
			if status >= 500 {
				return true
			}
		case "gateway-error":
			if status == 502 || status == 503 || status == 504 {
				return true
			}
		case "retriable-4xx":
			if status == http.StatusConflict {
				return true
			}
		default:
			if code, ok := grpcRetryCodes[on]; ok && resp.Header.Get("Grpc-Status") == code {
				return true
			}
		}
	}
	return false
}

func retryError(rp *RetryPolicy, err error) bool {
	var op *net.OpError
	dial := errors.As(err, &op) && op.Op == "dial"
	for _, on := range rp.RetryOn {
		switch on {
		case "5xx", "gateway-error":
			return true
		case "connect-failure":
			if dial {
				return true
			}
		case "reset":
			if !dial {
				return true
			}
		}
	}
	return false
}

// recordedBody passes an unsized request body through to the first try
// and keeps a copy of up to maxRetryBody bytes for retries. Its reader
// is the transport; complete may be called from the request's goroutine
// meanwhile.
type recordedBody struct {
	r        io.ReadCloser
	mu       sync.Mutex
	buf      []byte
	eof, big bool
}

func (b *recordedBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.mu.Lock()
	if !b.big {
		if len(b.buf)+n > maxRetryBody {
			b.big, b.buf = true, nil
		} else {
			b.buf = append(b.buf, p[:n]...)
		}
	}
	if err == io.EOF {
		b.eof = true
	}
	b.mu.Unlock()
	return n, err
}

func (b *recordedBody) Close() error { return b.r.Close() }

// complete returns the whole body (non-nil) if it was read to its end
// within maxRetryBody.
func (b *recordedBody) complete() ([]byte, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.eof || b.big {
		return nil, false
	}
	return append([]byte{}, b.buf...), true
}

// retryBuf is a request body kept for replay on retry. Small ones are
// read into pooled retryBufs, which go back to the pool once nothing can
// read them: RoundTrip holds one until it returns, and each try's body
// until the transport closes that body (HTTP/2 may still be sending a
// try's body from its own goroutine after RoundTrip has returned).
type retryBuf struct {
	b      []byte
	pooled bool
	refs   atomic.Int32
}

var retryBufPool = sync.Pool{New: func() any { return &retryBuf{b: make([]byte, 0, smallBody), pooled: true} }}

// readRetryBody reads a body of declared length n (at most maxRetryBody)
// as io.ReadAll of its first maxRetryBody+1 bytes would.
func readRetryBody(r io.Reader, n int64) (*retryBuf, error) {
	var rb *retryBuf
	if n < smallBody {
		// One spare byte: the read that finds EOF, or a body longer
		// than declared, needs no larger buffer.
		rb = retryBufPool.Get().(*retryBuf)
	} else {
		rb = &retryBuf{b: make([]byte, 0, n+1)}
	}
	rb.refs.Store(1)
	buf := rb.b[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		m, err := r.Read(buf[len(buf):min(cap(buf), maxRetryBody+1)])
		buf = buf[:len(buf)+m]
		if err == io.EOF || len(buf) > maxRetryBody {
			rb.b = buf
			return rb, nil
		}
		if err != nil {
			rb.b = buf
			rb.release()
			return nil, err
		}
	}
}

func (b *retryBuf) release() {
	if b.refs.Add(-1) == 0 && b.pooled {
		// A buffer that grew (a body longer than declared) is not kept.
		if cap(b.b) == smallBody {
			b.b = b.b[:0]
			retryBufPool.Put(b)
		}
	}
}

// tryBody reads one try's copy of a retryBuf. Reads after Close fail,
// so a closed body can never show the bytes of the request that reuses
// its buffer.
type tryBody struct {
	mu  sync.Mutex
	r   bytes.Reader
	buf *retryBuf
}

// tryReq is one try's request, URL, body reader and response closer in
// one allocation: each is used by that try alone.
type tryReq struct {
	fwdReq
	body tryBody
	done doneBody
}

func (b *tryBody) open(buf *retryBuf) {
	buf.refs.Add(1)
	b.buf = buf
	b.r.Reset(buf.b)
}

func (b *tryBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf == nil {
		return 0, errBodyAfterClose
	}
	return b.r.Read(p)
}

func (b *tryBody) Close() error {
	b.mu.Lock()
	buf := b.buf
	b.buf = nil
	b.r.Reset(nil)
	b.mu.Unlock()
	if buf != nil {
		buf.release()
	}
	return nil
}

// doneBody ends a try when its response body is closed: the per-try
// timeout's context is released and the endpoint's request count drops.
type doneBody struct {
	io.ReadCloser
	once   sync.Once
	cancel context.CancelFunc
	ep     *endpoint
}

func (b *doneBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(func() {
		if b.cancel != nil {
			b.cancel()
		}
		b.ep.active.Add(-1)
	})
	return err
}

// serveTCP splices an app's connection to a peer sidecar over mTLS: to
// the listener's cluster, or for a transparent listener to the cluster of
// the connection's original destination.
func (l *outboundListener) serveTCP(c net.Conn) {
	start := l.p.clock.Now()
	st := l.p.state.Load()
	cl := st.clusters[l.cfg.Cluster]
	self := l.p.selfID()
	ns, wl := workloadParts(self)
	res := reqLog{direction: "outbound", proto: "tcp", source: self.String(), srcNS: ns, srcWL: wl, dest: l.cfg.Cluster, authz: authzNone}
	defer func() {
		if res.status == handedOff {
			return
		}
		res.dur = l.p.clock.Since(start)
		l.p.observeTCP(&res)
	}()
	if l.cfg.Protocol == "transparent" {
		dst, err := originalDst(c)
		if cl = st.byAddr[serviceKey(dst)]; err != nil || cl == nil {
			l.p.log.Warn("transparent: no cluster for the original destination", "listener", l.cfg.Name, "destination", dst, "error", err)
			res.status = 404
			l.p.countTCP(&res)
			c.Close()
			return
		}
		res.dest = cl.cfg.Name
		// HTTP is routed, retried and decided per request: hand it to
		// the HTTP server; anything else is spliced.
		pc, isHTTP := sniffHTTP(c, cl.cfg.Name)
		if isHTTP {
			res.status = handedOff
			l.h1.serveConn(pc)
			return
		}
		c = pc
	}
	var last *endpoint
	for try := 0; try < 2; try++ {
		ep := cl.pick(last, l.p.clock.Now().UnixNano())
		if ep == nil {
			break
		}
		last = ep
		raw, err := cl.tcpDial(l.ctx, "tcp", ep.addr)
		if errors.Is(err, errOverflow) {
			break
		}
		status := http.StatusOK
		if err != nil {
			status = http.StatusServiceUnavailable
		}
		cl.outcome(ep, status, l.p.clock.Now().UnixNano())
		if err != nil {
			continue
		}
		tc := tls.Client(raw, cl.tcpTLS)
		if err := tlsHandshake(l.ctx, tc); err != nil {
			l.p.metrics.handshakeErrors.WithLabelValues("outbound").Inc()
			l.p.log.Warn("outbound tcp handshake", "cluster", cl.cfg.Name, "endpoint", ep.addr, "error", err)
			raw.Close()
			continue
		}
		l.p.countTCP(&res)
		ep.active.Add(1)
		res.sent, res.recv = l.p.splice(c, tc)
		ep.active.Add(-1)
		return
	}
	res.status = 503
	l.p.countTCP(&res)
	c.Close()
}
