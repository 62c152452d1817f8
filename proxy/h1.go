package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/net/http/httpguts"
)

// h1Transport is the HTTP/1.1 client of the hot path: the proxy's own
// request, when small, is written and its response read by the calling
// goroutine on a pooled keep-alive connection. net/http's Transport hands
// every request to a per-connection write goroutine and every response
// back from a read goroutine; under CPU contention each of those hand-offs
// waits for a scheduler slot, which is most of the latency a proxy pair
// adds. Anything else (bodies over maxFastBody or of unknown length,
// Expect, upgrades, CONNECT) goes to the fallback Transport unchanged.
// Parsing and serialization are net/http's (Request.Write, ReadResponse).
type h1Transport struct {
	fallback *http.Transport
	dial     func(ctx context.Context, addr string) (net.Conn, error)
	tls      bool
	idleTime time.Duration
	peekIdle time.Duration
	// lim counts the cluster's connections; nil for none.
	lim *connLimit

	mu   sync.Mutex
	idle map[string][]*h1Conn
}

// maxFastBody bounds the request body read into memory to send in one
// write; larger ones stream through the fallback.
const maxFastBody = 64 << 10

// smallBody bounds the request bodies that borrow smallBodyPool's
// buffers; larger ones (up to maxFastBody) are allocated.
const smallBody = 4 << 10

var smallBodyPool = sync.Pool{New: func() any { b := make([]byte, smallBody); return &b }}

// maxIdlePerHost bounds the idle connections kept per address.
const maxIdlePerHost = 256

type h1Conn struct {
	addr     string // the pool's key: the address as requests name it
	c        net.Conn
	raw      net.Conn // the TCP connection under TLS, for liveness checks
	sent     *sentConn
	deadline bool // a request's deadline is set on c (deadlineOnly)
	// down holds c while its response body is read (see exchange).
	down     *downCtx
	probe    *probe  // liveness check state (h1_linux.go), made on first use
	body     lenBody // the body reader of readResponse's responses
	br       *bufio.Reader
	bw       *bufio.Writer
	idleFrom time.Time
}

func newH1Transport(fallback *http.Transport, cfg *tls.Config, dialer *net.Dialer, lim *connLimit) *h1Transport {
	t := &h1Transport{fallback: fallback, tls: cfg != nil, idleTime: 90 * time.Second, peekIdle: peekIdle, idle: map[string][]*h1Conn{}, lim: lim}
	t.dial = func(ctx context.Context, addr string) (net.Conn, error) {
		raw, err := dialer.DialContext(ctx, "tcp", addr)
		if lim != nil {
			// get took the slot; the connection holds it until closed.
			if err != nil {
				lim.done(poolKey{poolH1, addr})
				return nil, err
			}
			raw = lim.track(raw, poolKey{poolH1, addr})
		}
		if err != nil {
			return nil, err
		}
		if a := ackedAtStart(raw); a >= 0 {
			raw = &sentConn{Conn: raw, n: a}
		}
		if cfg == nil {
			return raw, nil
		}
		tc := tls.Client(raw, cfg)
		hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
		defer cancel()
		if err := tc.HandshakeContext(hctx); err != nil {
			raw.Close()
			return nil, err
		}
		return tc, nil
	}
	return t
}

// fast tells whether r can take the synchronous path.
func fast(r *http.Request) bool {
	if r.Method == http.MethodConnect || r.Header.Get("Expect") != "" || r.Header.Get("Upgrade") != "" {
		return false
	}
	if r.Body == nil || r.Body == http.NoBody {
		return true
	}
	return r.ContentLength >= 0 && r.ContentLength <= maxFastBody
}

func (t *h1Transport) CloseIdleConnections() {
	t.mu.Lock()
	idle := t.idle
	t.idle = map[string][]*h1Conn{}
	t.mu.Unlock()
	for _, cs := range idle {
		for _, c := range cs {
			c.c.Close()
		}
	}
	t.fallback.CloseIdleConnections()
}

func (t *h1Transport) RoundTrip(r *http.Request) (*http.Response, error) {
	if !fast(r) {
		return t.fallback.RoundTrip(r)
	}
	var body []byte
	if r.Body != nil && r.Body != http.NoBody {
		// The body is copied into the connection's writer before
		// RoundTrip returns, so a small one borrows a pooled buffer.
		if r.ContentLength <= smallBody {
			bp := smallBodyPool.Get().(*[]byte)
			defer smallBodyPool.Put(bp)
			body = (*bp)[:r.ContentLength]
		} else {
			body = make([]byte, r.ContentLength)
		}
		_, err := io.ReadFull(r.Body, body)
		if err == nil {
			// A body longer than its Content-Length is refused, as
			// net/http's transport does.
			var one [1]byte
			if n, _ := r.Body.Read(one[:]); n > 0 {
				err = errors.New("request body length differs from its Content-Length")
			}
		} else if err == io.ErrUnexpectedEOF || err == io.EOF {
			err = errors.New("request body length differs from its Content-Length")
		}
		r.Body.Close()
		if err != nil {
			return nil, err
		}
	}
	addr := r.URL.Host
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(strings.Trim(addr, "[]"), "80")
	}
	// A pooled connection the peer has closed fails before any answer.
	// The request is then repeated once, as net/http does, if it is
	// idempotent or if the peer provably never took any of it (see
	// exchange); the repeat checks every pooled connection it takes
	// (the others the peer closed at the same time go) or dials.
	for try := 0; ; try++ {
		c, reused, err := t.get(r.Context(), addr, try > 0)
		if err != nil {
			return nil, err
		}
		resp, err := t.exchange(r, c, body, reused)
		if err == nil {
			return resp, nil
		}
		var na noAnswer
		if !reused || try > 0 || r.Context().Err() != nil || !errors.As(err, &na) || !na.untaken && !idempotent(r) {
			return nil, errors.Unwrap(err)
		}
	}
}

func idempotent(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return r.Header.Get("Idempotency-Key") != "" || r.Header.Get("X-Idempotency-Key") != ""
}

// deadlineOnly is a context that, while onlyDeadline says so, can end
// only at its deadline before the request is done (routeCtx): the
// transport then sets the deadline on the connection rather than wait on
// Done.
type deadlineOnly interface {
	onlyDeadline() (time.Time, bool)
}

// onlyDeadline is ctx's deadline if, for now, it can end only then.
func onlyDeadline(ctx context.Context) (time.Time, bool) {
	if dc, ok := ctx.(deadlineOnly); ok {
		return dc.onlyDeadline()
	}
	return time.Time{}, false
}

// noAnswer wraps failures before any byte of a response arrived.
type noAnswer struct {
	err error
	// untaken: the peer closed without acknowledging a byte of the
	// request, which it therefore never read.
	untaken bool
}

func (e noAnswer) Error() string { return e.err.Error() }
func (e noAnswer) Unwrap() error { return e.err }

type wrapped struct{ err error }

func (e wrapped) Error() string { return e.err.Error() }
func (e wrapped) Unwrap() error { return e.err }

// aLongTimeAgo makes a connection's pending reads and writes fail at once.
var aLongTimeAgo = time.Unix(1, 0)

// exchange sends r on c and reads the response head. A reused
// connection that ends (EOF) before any byte of the response is asked
// whether the peer acknowledged any byte of this request (untaken).
// Why that proves the request was not taken: the peer's application can
// read only bytes its TCP accepted, and every segment a TCP sends
// acknowledges all it has accepted, so a peer that read any of the
// request and then closed (close(2) with nothing unread sends a FIN)
// acknowledged it on that FIN at the latest; a peer that closed with
// bytes of it unread sends a reset instead, which reads as an error, not
// EOF. The kernel processes a segment's acknowledgment before its FIN,
// so once the EOF is read the count is final for that segment. What the
// argument assumes: a peer that has sent its FIN does not go on to act
// on requests it cannot answer (servers that linger after closing read
// and discard).
func (t *h1Transport) exchange(r *http.Request, c *h1Conn, body []byte, reused bool) (*http.Response, error) {
	ctx := r.Context()
	stop := noStop
	// down, when not nil, holds c until the answer is read (h1Body) or
	// fails: a client found gone interrupts it there.
	var down *downCtx
	if d, ok := onlyDeadline(ctx); ok {
		if !d.IsZero() || c.deadline {
			_ = c.c.SetDeadline(d)
			c.deadline = !d.IsZero()
		}
		down = hook(ctx, c)
	} else {
		if c.deadline {
			_ = c.c.SetDeadline(time.Time{})
			c.deadline = false
		}
		if ctx.Done() != nil {
			stop = context.AfterFunc(ctx, func() { _ = c.c.SetDeadline(aLongTimeAgo) })
		}
	}
	var sentBefore int64
	if c.sent != nil {
		sentBefore = c.sent.n
	}
	fail := func(err error, answered bool) (*http.Response, error) {
		stop()
		down.unhook(c)
		untaken := !answered && reused && err == io.EOF && ctx.Err() == nil && c.untaken(sentBefore)
		c.c.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		if !answered {
			return nil, noAnswer{err: err, untaken: untaken}
		}
		return nil, wrapped{err}
	}
	if down != nil && down.Err() != nil {
		// Gone before c was registered.
		return fail(context.Canceled, false)
	}
	if !writeRequest(c.bw, r, body) {
		out := *r
		out.Body = nil
		if body != nil {
			out.Body = io.NopCloser(bytes.NewReader(body))
		}
		if err := out.Write(c.bw); err != nil {
			return fail(err, false)
		}
	}
	if err := c.bw.Flush(); err != nil {
		return fail(err, false)
	}
	for {
		if _, err := c.br.Peek(1); err != nil {
			return fail(err, false)
		}
		resp, spare, err := readResponse(c, r)
		if err != nil {
			return fail(err, true)
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			resp.Body.Close()
			return fail(errors.New("unexpected 101 Switching Protocols"), true)
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 {
			continue // 1xx informational: the final answer follows
		}
		reuse := !resp.Close && !r.Close
		if resp.Body == http.NoBody || resp.Body == nil {
			resp.Body = http.NoBody
			// Both always run: a registration left behind would keep
			// the connection's next requests from being interrupted.
			stopped := stop()
			unhooked := down.unhook(c)
			t.release(c, reuse && stopped && unhooked)
			return resp, nil
		}
		if spare == nil {
			spare = new(h1Body)
		}
		c.down = down
		*spare = h1Body{rc: resp.Body, t: t, c: c, stop: stop, reuse: reuse}
		resp.Body = spare
		return resp, nil
	}
}

// readResponse reads the common response (HTTP/1.1, a head that fits in
// the connection's buffer, a single Content-Length or no body) into a
// Response as http.ReadResponse would, from one string for the whole
// head; anything else is read by http.ReadResponse itself. spare, when
// not nil, is an h1Body made with the response, for its body.
func readResponse(c *h1Conn, req *http.Request) (resp *http.Response, spare *h1Body, err error) {
	head, err := peekHead(c.br)
	if err != nil {
		return nil, nil, err
	}
	if head == nil {
		resp, err = http.ReadResponse(c.br, req)
		return resp, nil, err
	}
	hr := parseResponse(head, req)
	if hr == nil {
		resp, err = http.ReadResponse(c.br, req)
		return resp, nil, err
	}
	resp = &hr.resp
	_, _ = c.br.Discard(len(head))
	if resp.ContentLength == 0 {
		resp.Body = http.NoBody
	} else {
		c.body = lenBody{r: c.br, n: resp.ContentLength}
		resp.Body = &c.body
	}
	return resp, &hr.body, nil
}

// parseResponseHead parses a response head ending in CRLF CRLF, or
// returns nil for one it leaves to http.ReadResponse: other versions,
// 1xx, 204, 304, answers to HEAD, Transfer-Encoding, no or several
// Content-Lengths, or anything malformed.
func parseResponseHead(head []byte, req *http.Request) *http.Response {
	if hr := parseResponse(head, req); hr != nil {
		return &hr.resp
	}
	return nil
}

func parseResponse(head []byte, req *http.Request) *h1Resp {
	for i, c := range head {
		if c == '\n' && (i == 0 || head[i-1] != '\r') || c == '\r' && (i+1 == len(head) || head[i+1] != '\n') {
			return nil
		}
	}
	s := string(head[:len(head)-2])
	eol := indexCRLF(s)
	line := s[:eol]
	s = s[eol+2:]
	if len(line) < 12 || line[:9] != "HTTP/1.1 " || len(line) > 12 && line[12] != ' ' || req.Method == http.MethodHead {
		return nil
	}
	code := 0
	for _, d := range line[9:12] {
		if d < '0' || d > '9' {
			return nil
		}
		code = code*10 + int(d-'0')
	}
	if code < 200 || code == http.StatusNoContent || code == http.StatusNotModified {
		return nil
	}
	n := 0
	for rest := s; rest != ""; n++ {
		if rest[0] == ' ' || rest[0] == '\t' {
			return nil
		}
		rest = rest[indexCRLF(rest)+2:]
	}
	hr := new(h1Resp)
	h := make(http.Header, n)
	vals := hr.vals[:]
	if n > len(hr.vals) {
		vals = make([]string, n)
	}
	var cl string // the Content-Length, if exactly one
	ncl := 0
	for rest := s; rest != ""; {
		i := indexCRLF(rest)
		f := rest[:i]
		rest = rest[i+2:]
		colon := indexByte(f, ':')
		if colon <= 0 {
			return nil
		}
		name, value := f[:colon], trimOWS(f[colon+1:])
		if !isToken(name) || !httpguts.ValidHeaderFieldValue(value) {
			return nil
		}
		key := canonicalHeader(name)
		switch key {
		case "Content-Length":
			cl, ncl = value, ncl+1
		case "Transfer-Encoding", "Trailer":
			return nil
		}
		vals[0] = value
		if vv, ok := h[key]; ok {
			h[key] = append(vv, value)
		} else {
			h[key] = vals[:1:1]
		}
		vals = vals[1:]
	}
	length := int64(-1)
	switch {
	case ncl == 1:
		v, err := strconv.ParseUint(cl, 10, 63)
		if err != nil || cl == "" || cl[0] < '0' || cl[0] > '9' {
			return nil
		}
		length = int64(v)
	case ncl > 1:
		return nil
	}
	if length < 0 {
		return nil // a body read to the connection's end
	}
	if pragma, ok := h["Pragma"]; ok && len(pragma) > 0 && pragma[0] == "no-cache" {
		if _, ok := h["Cache-Control"]; !ok {
			h["Cache-Control"] = []string{"no-cache"}
		}
	}
	closing := httpguts.HeaderValuesContainsToken(h["Connection"], "close")
	if closing {
		delete(h, "Connection")
	}
	hr.resp = http.Response{
		Status: line[9:], StatusCode: code, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, ContentLength: length, Close: closing, Request: req,
	}
	return hr
}

// h1Resp is a parsed response, the backing array of its header values
// (for up to 8 fields, an app's usual answer) and the transport's reader
// of its body, in one allocation: all live exactly as long as the
// response.
type h1Resp struct {
	resp http.Response
	body h1Body
	vals [8]string
}

// lenBody reads a body of known length from the connection's reader.
type lenBody struct {
	r *bufio.Reader
	n int64
}

func (b *lenBody) Read(p []byte) (int, error) {
	if b.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.n {
		p = p[:b.n]
	}
	n, err := b.r.Read(p)
	b.n -= int64(n)
	if err == io.EOF && b.n > 0 {
		err = io.ErrUnexpectedEOF
	}
	if err == nil && b.n == 0 {
		err = io.EOF
	}
	return n, err
}

func (b *lenBody) Close() error { return nil }

// noStop stands for context.AfterFunc's stop when the context cannot end.
func noStop() bool { return true }

// reqExclude are the header fields writeRequest writes itself.
var reqExclude = map[string]bool{"Host": true, "User-Agent": true, "Content-Length": true, "Transfer-Encoding": true, "Trailer": true}

// writeRequest serializes r with body as Request.Write does for the
// common request, with fewer allocations: the same Host and User-Agent
// rules, Content-Length as net/http sends it, header fields sorted and
// cleaned by Header.WriteSubset. It writes nothing and returns false for
// anything less common (opaque URLs, trailers, non-ASCII or invalid hosts,
// client traces that watch the write), which Request.Write then handles.
func writeRequest(bw *bufio.Writer, r *http.Request, body []byte) bool {
	if r.URL.Opaque != "" || r.Method == "" || r.Header["Trailer"] != nil || r.Header["Transfer-Encoding"] != nil {
		return false
	}
	if tr := httptrace.ContextClientTrace(r.Context()); tr != nil && (tr.WroteHeaderField != nil || tr.WroteHeaders != nil || tr.WroteRequest != nil) {
		return false
	}
	host := r.Host
	if host == "" {
		host = r.URL.Host
	}
	for i := 0; i < len(host); i++ {
		if host[i] >= utf8.RuneSelf {
			return false
		}
	}
	if host == "" || !httpguts.ValidHostHeader(host) {
		return false
	}
	uri := r.URL.RequestURI()
	for i := 0; i < len(uri); i++ {
		if uri[i] < ' ' || uri[i] == 0x7f {
			return false
		}
	}
	_, _ = bw.WriteString(r.Method)
	_ = bw.WriteByte(' ')
	_, _ = bw.WriteString(uri)
	_, _ = bw.WriteString(" HTTP/1.1\r\nHost: ")
	_, _ = bw.WriteString(host)
	_, _ = bw.WriteString("\r\n")
	ua := "Go-http-client/1.1"
	if _, ok := r.Header["User-Agent"]; ok {
		ua = r.Header.Get("User-Agent")
		if strings.ContainsAny(ua, "\r\n") {
			return false
		}
		ua = textproto.TrimString(ua)
	}
	if ua != "" {
		_, _ = bw.WriteString("User-Agent: ")
		_, _ = bw.WriteString(ua)
		_, _ = bw.WriteString("\r\n")
	}
	if r.Close && !httpguts.HeaderValuesContainsToken(r.Header["Connection"], "close") {
		_, _ = bw.WriteString("Connection: close\r\n")
	}
	if len(body) > 0 || r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch {
		_, _ = bw.WriteString("Content-Length: ")
		_, _ = bw.WriteString(strconv.Itoa(len(body)))
		_, _ = bw.WriteString("\r\n")
	}
	_ = r.Header.WriteSubset(bw, reqExclude)
	_, _ = bw.WriteString("\r\n")
	_, _ = bw.Write(body)
	return true
}

// h1Body returns its connection to the pool once read to the end and
// closed; a body closed early, or cut by a cancelled context, closes it.
type h1Body struct {
	rc    io.ReadCloser
	t     *h1Transport
	c     *h1Conn
	stop  func() bool
	reuse bool
	eof   bool
	done  bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	if b.done {
		return 0, errBodyAfterClose
	}
	n, err := b.rc.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

func (b *h1Body) Close() error {
	if b.done {
		return nil
	}
	b.done = true
	if !b.eof {
		// Closed before its end, the body is not worth reading on: the
		// connection ends first, as http.ReadResponse's body would
		// otherwise read a chunked one to its end on Close, holding
		// the connection (and the upstream's work) for as long as the
		// answer lasts after its client went away.
		b.c.c.Close()
	}
	err := b.rc.Close()
	stopped := b.stop()
	unhooked := b.c.down.unhook(b.c)
	b.c.down = nil
	b.t.release(b.c, stopped && unhooked && b.eof && b.reuse && err == nil && b.c.br.Buffered() == 0)
	return err
}

func (t *h1Transport) release(c *h1Conn, reuse bool) {
	if !reuse {
		c.c.Close()
		return
	}
	c.idleFrom = time.Now()
	t.mu.Lock()
	if t.lim != nil && t.lim.handoff(c) {
		t.mu.Unlock()
		return
	}
	// The pool is a stack (the warmest connection is reused first); the
	// coldest, at the bottom, are retired here once idle too long, so
	// that a steady load does not keep connections the app has closed.
	cs := t.idle[c.addr]
	var old []*h1Conn
	for len(cs) > 0 && c.idleFrom.Sub(cs[0].idleFrom) >= t.idleTime {
		old = append(old, cs[0])
		cs = cs[1:]
	}
	keep := len(cs) < maxIdlePerHost
	if keep {
		cs = append(cs, c)
	}
	t.idle[c.addr] = cs
	t.mu.Unlock()
	for _, o := range old {
		o.c.Close()
	}
	if !keep {
		c.c.Close()
	}
}

// peekIdle is how long a pooled connection must have been idle before
// get checks that the peer has not closed it. A connection the peer
// closed fails before any answer and its request is repeated when that
// is provably safe (exchange), so the check, a system call, is spared
// on busy connections. What the repeat cannot tell apart is a peer that
// closes with the request unread in its buffer (a reset): that happens
// when the peer's idle timeout ends just as the request arrives, which
// for a connection idle less than peekIdle takes a peer that times out
// idle connections sooner than that (server defaults are seconds).
const peekIdle = time.Second

// get takes the most recently used idle connection that is still open,
// or dials. check checks every pooled connection, however recently used.
func (t *h1Transport) get(ctx context.Context, addr string, check bool) (*h1Conn, bool, error) {
	now := time.Now()
	for {
		t.mu.Lock()
		cs := t.idle[addr]
		if len(cs) == 0 {
			c, err := t.connSlot(ctx, addr) // unlocks t.mu
			if c != nil || err != nil {
				return c, c != nil, err
			}
			break
		}
		c := cs[len(cs)-1]
		cs[len(cs)-1] = nil
		t.idle[addr] = cs[:len(cs)-1]
		t.mu.Unlock()
		idle := now.Sub(c.idleFrom)
		if idle < t.idleTime && (idle < t.peekIdle && !check && c.br.Buffered() == 0 || t.alive(c)) {
			return c, true, nil
		}
		c.c.Close()
	}
	nc, err := t.dial(ctx, addr)
	if err != nil {
		return nil, false, err
	}
	raw := nc
	if tc, ok := nc.(*tls.Conn); ok {
		raw = tc.NetConn()
	}
	sent, _ := raw.(*sentConn)
	return &h1Conn{addr: addr, c: nc, raw: raw, sent: sent, br: bufio.NewReaderSize(nc, 4<<10), bw: bufio.NewWriterSize(nc, 4<<10)}, false, nil
}

// sentConn counts the bytes written to a TCP connection (under TLS, if
// any), to compare with what the peer acknowledged (h1Conn.untaken). A
// connection is used by one request at a time.
type sentConn struct {
	net.Conn
	// n starts at what the kernel counts as acknowledged before any
	// write (Linux counts the SYN), so that it is what the count will
	// read once every byte written is acknowledged.
	n int64
}

func (c *sentConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n += int64(n)
	return n, err
}

// SyscallConn reaches the socket for the liveness check and TCP_INFO.
func (c *sentConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}
