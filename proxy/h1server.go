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
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1Server serves the common HTTP/1.1 request on the connection's own
// goroutine: the request head is parsed from one bounded buffer, the body
// (known length, at most maxFastBody) is read in place, and the response
// is written straight to a pooled buffer. net/http's server costs a
// per-request context, a background read goroutine after every request
// with a body, header parsing through textproto and a chunking layer; a
// proxy pair pays that four times per request.
//
// Anything unusual is handed, unread, to the fallback http.Server (the
// connection is given to it with the buffered bytes in front): a head
// that does not fit in h1HeadMax, HTTP versions other than 1.1, CONNECT,
// upgrades, Expect, chunked or large bodies, OPTIONS *, a missing,
// repeated or malformed Host, and any header net/http would refuse.
// Request smuggling vectors get a 400 and the connection is closed:
// Content-Length with Transfer-Encoding, more than one Content-Length,
// obs-fold continuation lines, and bare LF line ends.
//
// The handler is the listener's ServeHTTP, unchanged, so policy, header
// rules, metrics, logs and traces are the same on both paths. It is safe
// for concurrent use.
type h1Server struct {
	handler  http.Handler
	fallback *connListener
	// connCtx gives a connection's requests their context (the verified
	// peer on inbound listeners).
	connCtx func(net.Conn) context.Context
	// logPanic reports a handler's panic other than http.ErrAbortHandler.
	logPanic func(any)
	// watchAfter is how long a request waits for its answer before its
	// client's connection is watched (gone.go); gone counts the clients
	// found gone (nil: not counted).
	watchAfter time.Duration
	gone       interface{ Inc() }
	// watched and readAhead count watchers started and the bytes they
	// read ahead (for tests).
	watched   atomic.Int64
	readAhead atomic.Int64

	mu      sync.Mutex
	conns   map[*h1ServerConn]struct{}
	closing atomic.Bool
	wg      sync.WaitGroup
	// done ends hand-offs still waiting for the fallback server.
	done     chan struct{}
	doneOnce sync.Once
	// sweeping: the sweeper runs (under mu); sweepStop ends it.
	sweeping  bool
	sweepStop chan struct{}
}

// h1HeadMax bounds a request head on the fast path; larger heads (up to
// the fallback server's MaxHeaderBytes) go to net/http.
const h1HeadMax = 4 << 10

const (
	h1ReadHeaderTimeout = 10 * time.Second
	h1IdleTimeout       = 5 * time.Minute
	// h1IdleSlack is how far the idle deadline may lag: moving it at
	// most once a second, rather than setting and clearing it around
	// every request, spares the runtime's timer heap three updates per
	// request (a new earliest timer also wakes an idle thread) for an
	// idle timeout that is exact to the second. The body of a request
	// then reads under that deadline rather than under none.
	h1IdleSlack = time.Second
)

type h1ServerConn struct {
	c      net.Conn
	br     *bufio.Reader
	bw     *bufio.Writer
	ctx    context.Context
	down   *downCtx // ctx
	remote string
	tls    *tls.ConnectionState
	// base is what every request on the connection starts from: its
	// context, remote address and TLS state, set once rather than by a
	// WithContext copy per request.
	base *http.Request
	idle atomic.Bool
	// closing is the server's: a response sent while it shuts down
	// tells the client the connection ends.
	closing *atomic.Bool
	// deadlineMoved: the handler set the read deadline (an inbound
	// holding a body for its check), so the idle one must be set anew.
	deadlineMoved bool

	// The watch of a waiting request (gone.go). wait is the request's
	// number and state; seq the last number given (the connection's
	// goroutine's); seen what the sweeper saw last (under the server's
	// mu). wstop (under wmu) stops the watcher; wgone says it found
	// the client gone; wwg waits for it.
	wait  atomic.Uint64
	seq   uint64
	seen  uint64
	wmu   sync.Mutex
	wstop bool
	wgone bool
	wwg   sync.WaitGroup
}

func newH1Server(h http.Handler, fallback *connListener, connCtx func(net.Conn) context.Context) *h1Server {
	return &h1Server{handler: h, fallback: fallback, connCtx: connCtx, conns: map[*h1ServerConn]struct{}{}, logPanic: func(any) {},
		done: make(chan struct{}), watchAfter: DefaultWatchClientAfter, sweepStop: make(chan struct{})}
}

var (
	h1ReaderPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, h1HeadMax) }}
	h1WriterPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// serveConn serves c until it closes, goes idle too long, or is handed to
// the fallback server. It returns when it is done with c.
func (s *h1Server) serveConn(c net.Conn) {
	sc := &h1ServerConn{c: c, remote: c.RemoteAddr().String(), closing: &s.closing}
	if tc, ok := c.(*tls.Conn); ok {
		st := tc.ConnectionState()
		sc.tls = &st
	}
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		c.Close()
		return
	}
	s.conns[sc] = struct{}{}
	s.wg.Add(1)
	if !s.sweeping {
		s.sweeping = true
		go s.sweep()
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, sc)
		s.mu.Unlock()
		s.wg.Done()
	}()
	sc.down = newDownCtx(s.connCtx(c))
	// Ended with the connection, as net/http's connection context is:
	// what a handler left running stops.
	defer sc.down.cancel()
	sc.ctx = sc.down
	sc.base = (&http.Request{RemoteAddr: sc.remote, TLS: sc.tls}).WithContext(sc.ctx)
	sc.br = h1ReaderPool.Get().(*bufio.Reader)
	sc.br.Reset(c)
	sc.bw = h1WriterPool.Get().(*bufio.Writer)
	sc.bw.Reset(c)
	handedOff := s.loop(sc)
	sc.bw.Reset(nil)
	h1WriterPool.Put(sc.bw)
	if !handedOff {
		c.Close()
		sc.br.Reset(nil)
		h1ReaderPool.Put(sc.br)
	}
}

// loop serves requests; it reports whether the connection went to the
// fallback server (which then owns it and its reader).
func (s *h1Server) loop(sc *h1ServerConn) bool {
	// idleUntil is the idle deadline last set; zero once cleared.
	var idleUntil time.Time
	for first := true; ; first = false {
		sc.idle.Store(true)
		if s.closing.Load() {
			return false
		}
		if first {
			_ = sc.c.SetReadDeadline(time.Now().Add(h1ReadHeaderTimeout))
		} else if now := time.Now(); idleUntil.IsZero() || now.Add(h1IdleTimeout).Sub(idleUntil) >= h1IdleSlack {
			idleUntil = now.Add(h1IdleTimeout)
			_ = sc.c.SetReadDeadline(idleUntil)
		}
		// Shutdown sets its deadline after closing: checking again
		// here means one of the two deadlines is the shutdown's (a
		// deadline left as it was is not ours to worry about).
		if s.closing.Load() {
			return false
		}
		if _, err := sc.br.Peek(1); err != nil {
			return false
		}
		sc.idle.Store(false)
		// A head that is all in already needs no header deadline (the
		// common case: it came in one segment), and the idle one is
		// left in place for the body and the next wait.
		timed := first
		if !first {
			if b, _ := sc.br.Peek(sc.br.Buffered()); !bytes.Contains(b, crlfcrlf) {
				_ = sc.c.SetReadDeadline(time.Now().Add(h1ReadHeaderTimeout))
				timed = true
			}
		}
		head, err := peekHead(sc.br)
		if err != nil {
			return false
		}
		if head == nil {
			return s.handOff(sc)
		}
		req, verdict := parseRequest(head, sc.base)
		switch verdict {
		case headFallback:
			return s.handOff(sc)
		case headBad:
			writeBadRequest(sc)
			return false
		}
		_, _ = sc.br.Discard(len(head))
		if timed {
			_ = sc.c.SetReadDeadline(time.Time{})
			idleUntil = time.Time{}
		}
		if !s.serveRequest(sc, req) {
			return false
		}
		if sc.deadlineMoved {
			sc.deadlineMoved, idleUntil = false, time.Time{}
		}
	}
}

// handOff gives the connection, with the bytes read so far in front, to
// the fallback server.
func (s *h1Server) handOff(sc *h1ServerConn) bool {
	_ = sc.c.SetReadDeadline(time.Time{})
	pc := &peekedConn{Conn: sc.c, r: sc.br}
	if in, ok := sc.c.(*peekedConn); ok {
		pc.cluster = in.cluster
	}
	select {
	case s.fallback.ch <- pc:
	case <-s.fallback.done:
		sc.c.Close()
	case <-s.done:
		sc.c.Close()
	}
	return true
}

func writeBadRequest(sc *h1ServerConn) {
	_, _ = sc.bw.WriteString("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: 15\r\n\r\n400 Bad Request")
	_ = sc.bw.Flush()
}

// peekHead returns the request head (through its blank line) without
// consuming it, or nil when it does not fit in the reader's buffer.
func peekHead(br *bufio.Reader) ([]byte, error) {
	from := 0
	for {
		b, _ := br.Peek(br.Buffered())
		if i := bytes.Index(b[max(0, from-3):], crlfcrlf); i >= 0 {
			return b[:max(0, from-3)+i+4], nil
		}
		// A bare LF ends the search: the parser refuses it (a peer that
		// ends lines with LF alone would wait here forever otherwise).
		for i := from; i < len(b); i++ {
			if b[i] == '\n' && (i == 0 || b[i-1] != '\r') {
				return b[:i+1], nil
			}
		}
		if len(b) >= br.Size() {
			return nil, nil
		}
		from = len(b)
		if _, err := br.Peek(len(b) + 1); err != nil {
			return nil, err
		}
	}
}

var crlfcrlf = []byte("\r\n\r\n")

type headVerdict int

const (
	headOK headVerdict = iota
	headFallback
	headBad
)

// h1Req is a request of the fast path with its URL, its body's reader
// and the backing array of its header values (for up to h1Vals fields)
// in one allocation: all live exactly as long as the request.
type h1Req struct {
	req  http.Request
	url  url.URL
	body h1ReqBody
	vals [h1Vals]string
}

// h1Vals covers the fields of a typical request between sidecars (the
// client's and the trace context) and keeps h1Req in a 640-byte size
// class; a request with more fields gets a slice of its own.
const h1Vals = 8

// parseRequestHead parses a request head ending in CRLF CRLF into a
// Request as net/http's server would (Host taken out of the header,
// Pragma: no-cache implying Cache-Control, Close from Connection). The
// request is a copy of base (nil for none) with the head's fields set.
// The body is left for the caller. It returns headFallback for requests
// the fast path leaves to net/http, headBad for smuggling vectors.
func parseRequestHead(head []byte, base *http.Request) (*http.Request, headVerdict) {
	hr, v := parseRequest(head, base)
	if hr == nil {
		return nil, v
	}
	return &hr.req, v
}

func parseRequest(head []byte, base *http.Request) (*h1Req, headVerdict) {
	// Bare CR or LF anywhere: a line-end ambiguity between hops.
	for i, c := range head {
		if c == '\n' && (i == 0 || head[i-1] != '\r') || c == '\r' && (i+1 == len(head) || head[i+1] != '\n') {
			return nil, headBad
		}
	}
	// One string for the whole head: names and values are its substrings.
	s := string(head[:len(head)-2])
	eol := indexCRLF(s)
	line := s[:eol]
	s = s[eol+2:]
	sp1 := indexByte(line, ' ')
	if sp1 <= 0 {
		return nil, headFallback
	}
	sp2 := indexByte(line[sp1+1:], ' ')
	if sp2 < 0 {
		return nil, headFallback
	}
	method, target, proto := line[:sp1], line[sp1+1:sp1+1+sp2], line[sp1+2+sp2:]
	if proto != "HTTP/1.1" || method == http.MethodConnect || !isToken(method) || target == "" || target[0] != '/' && !hasHTTPScheme(target) {
		return nil, headFallback
	}
	hr := new(h1Req)
	u := &hr.url
	if !parseOriginForm(target, u) {
		pu, err := url.ParseRequestURI(target)
		if err != nil {
			return nil, headFallback
		}
		u = pu
	}
	// Count the fields first: one map and one backing slice for values.
	n := 0
	for rest := s; rest != ""; n++ {
		i := indexCRLF(rest)
		if rest[0] == ' ' || rest[0] == '\t' {
			return nil, headBad // obs-fold
		}
		rest = rest[i+2:]
	}
	h := make(http.Header, n)
	vals := hr.vals[:]
	if n > h1Vals {
		vals = make([]string, n)
	}
	var cl string // the Content-Length, if exactly one
	ncl := 0
	te := false
	for rest := s; rest != ""; {
		i := indexCRLF(rest)
		f := rest[:i]
		rest = rest[i+2:]
		colon := indexByte(f, ':')
		if colon <= 0 {
			return nil, headFallback
		}
		name, value := f[:colon], trimOWS(f[colon+1:])
		if !isToken(name) || !httpguts.ValidHeaderFieldValue(value) {
			return nil, headFallback
		}
		key := canonicalHeader(name)
		switch key {
		case "Content-Length":
			cl, ncl = value, ncl+1
		case "Transfer-Encoding":
			te = true
		case "Expect", "Upgrade", "Trailer":
			return nil, headFallback
		}
		vals[0] = value
		if vv, ok := h[key]; ok {
			h[key] = append(vv, value)
		} else {
			h[key] = vals[:1:1]
		}
		vals = vals[1:]
	}
	if ncl > 1 || ncl == 1 && te {
		return nil, headBad
	}
	if te {
		return nil, headFallback
	}
	var length int64
	if ncl == 1 {
		v, err := strconv.ParseUint(cl, 10, 63)
		if err != nil || cl == "" || cl[0] < '0' || cl[0] > '9' {
			return nil, headBad
		}
		if v > maxFastBody {
			return nil, headFallback
		}
		length = int64(v)
	}
	hosts := h["Host"]
	if len(hosts) != 1 || !httpguts.ValidHostHeader(hosts[0]) {
		return nil, headFallback
	}
	if httpguts.HeaderValuesContainsToken(h["Connection"], "upgrade") {
		return nil, headFallback
	}
	delete(h, "Host")
	host := u.Host
	if host == "" {
		host = hosts[0]
	}
	if pragma, ok := h["Pragma"]; ok && len(pragma) > 0 && pragma[0] == "no-cache" {
		if _, ok := h["Cache-Control"]; !ok {
			h["Cache-Control"] = []string{"no-cache"}
		}
	}
	r := &hr.req
	if base != nil {
		*r = *base
	}
	r.Method, r.URL, r.Proto, r.ProtoMajor, r.ProtoMinor = method, u, proto, 1, 1
	r.Header, r.ContentLength, r.Host, r.RequestURI = h, length, host, target
	r.Close = httpguts.HeaderValuesContainsToken(h["Connection"], "close")
	return hr, headOK
}

// parseOriginForm parses the common request target, a path of characters
// that need no escaping and an optional query of visible ASCII, into u
// exactly as url.ParseRequestURI would; false leaves any other target to
// it.
func parseOriginForm(target string, u *url.URL) bool {
	if target == "" || target[0] != '/' {
		return false
	}
	path, query, hasQuery := strings.Cut(target, "?")
	for i := 0; i < len(path); i++ {
		if !pathChar(path[i]) {
			return false
		}
	}
	if hasQuery && query == "" {
		return false // ForceQuery
	}
	for i := 0; i < len(query); i++ {
		if query[i] <= ' ' || query[i] >= 0x7f {
			return false
		}
	}
	*u = url.URL{Path: path, RawQuery: query}
	return true
}

// pathChar says whether url leaves c in a path as it is (no escaping, so
// no RawPath).
func pathChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '-', '_', '.', '~', '$', '&', '+', ',', '/', ':', ';', '=', '@':
		return true
	}
	return false
}

func indexCRLF(s string) int {
	for i := 0; i+1 < len(s); i++ {
		if s[i] == '\r' && s[i+1] == '\n' {
			return i
		}
	}
	return -1
}

func indexByte(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == c {
			return i
		}
	}
	return -1
}

func hasHTTPScheme(t string) bool {
	return len(t) > 7 && (t[:7] == "http://" || len(t) > 8 && t[:8] == "https://")
}

func trimOWS(s string) string {
	for s != "" && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for s != "" && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !httpguts.IsTokenRune(rune(s[i])) {
			return false
		}
	}
	return true
}

// canonicalHeader is textproto's canonical form, without allocating for
// names already in it.
func canonicalHeader(name string) string {
	upper := true
	for i := 0; i < len(name); i++ {
		c := name[i]
		if upper && 'a' <= c && c <= 'z' || !upper && 'A' <= c && c <= 'Z' {
			return textproto.CanonicalMIMEHeaderKey(name)
		}
		upper = c == '-'
	}
	return name
}

// serveRequest runs the handler on one request and finishes its response;
// false ends the connection.
func (s *h1Server) serveRequest(sc *h1ServerConn, hr *h1Req) bool {
	r := &hr.req
	var body *h1ReqBody
	sc.seq++
	if r.ContentLength > 0 {
		body = &hr.body
		body.r, body.n, body.sc = sc.br, r.ContentLength, sc
		r.Body = body
	} else {
		r.Body = http.NoBody
		sc.startWait(sc.seq)
	}
	w := h1WriterPoolGet(sc, r)
	ran := s.run(w, r)
	if body != nil {
		body.close()
	}
	if sc.endWait() {
		// The client is gone (or half-closed): what it may still read
		// is the answer to its last request.
		w.close = true
	}
	if !ran {
		// The handler aborted the response (ReverseProxy does when the
		// upstream fails mid-body): the client sees the connection end.
		if body != nil {
			body.finish()
		}
		return false
	}
	ok := w.finish()
	if body != nil && !body.finish() {
		ok = false
	}
	// Cleared now, not at reuse: the header holds the upstream
	// response's value slices, which share the allocation of that
	// response and of the request it answered.
	clear(w.header)
	w.sc = nil
	h1RespPool.Put(w)
	return ok && !r.Close && !s.closing.Load()
}

// run calls the handler; a panic ends the connection, not the process,
// as in net/http's server.
func (s *h1Server) run(w *h1Response, r *http.Request) (ok bool) {
	defer func() {
		if v := recover(); v != nil {
			ok = false
			if v != http.ErrAbortHandler {
				s.logPanic(v)
			}
		}
	}()
	s.handler.ServeHTTP(w, r)
	return true
}

// h1ReqBody reads a request body of known length from the connection. It
// is closed for good when the handler returns: a transport still sending
// it then reads an error, as with net/http's server. Read to its end, it
// marks sc's request as waiting (gone.go).
// (h1Req's size class has room for no more fields.)
type h1ReqBody struct {
	mu     sync.Mutex
	r      *bufio.Reader
	n      int64
	closed bool
	err    error
	sc     *h1ServerConn
}

var errBodyAfterClose = errors.New("http: invalid Read on closed Body")

func (b *h1ReqBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, errBodyAfterClose
	}
	if b.err != nil {
		return 0, b.err
	}
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
	if err != nil {
		b.err = err
	}
	if b.n == 0 && err == nil {
		err = io.EOF
		if b.sc != nil {
			// Nothing reads the connection until the handler returns
			// (close then keeps a late Read from marking anything, and
			// from reading seq once the next request has it).
			b.sc.startWait(b.sc.seq)
		}
	}
	return n, err
}

func (b *h1ReqBody) Close() error { return nil }

// close ends the body for the handler, which has returned.
func (b *h1ReqBody) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
}

// finish discards what the handler left unread (bounded by maxFastBody)
// and closes the body; false when the connection cannot be reused.
func (b *h1ReqBody) finish() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	if b.err != nil {
		return false
	}
	if b.n > 0 {
		d, err := b.r.Discard(int(b.n))
		b.n -= int64(d)
		return err == nil
	}
	return true
}

// h1Response is the fast path's ResponseWriter. Like net/http's, it holds
// a small body back so that a response finished within it is sent with a
// Content-Length; otherwise the body is chunked. It adds a Date header
// and sniffs a missing Content-Type as net/http does.
type h1Response struct {
	sc      *h1ServerConn
	head    bool // a HEAD request: no body is sent
	close   bool // the request asked to close
	header  http.Header
	status  int
	wrote   bool // WriteHeader was called
	sent    bool // the head is on the wire (in bw)
	chunked bool
	clen    int64 // the declared Content-Length, or -1
	written int64
	buf     []byte
	broken  bool
}

const h1HoldBack = 2 << 10

var h1RespPool = sync.Pool{New: func() any { return &h1Response{header: http.Header{}, buf: make([]byte, 0, h1HoldBack)} }}

func h1WriterPoolGet(sc *h1ServerConn, r *http.Request) *h1Response {
	w := h1RespPool.Get().(*h1Response)
	*w = h1Response{sc: sc, head: r.Method == http.MethodHead, close: r.Close, header: w.header, buf: w.buf[:0], clen: -1}
	return w
}

func (w *h1Response) Header() http.Header { return w.header }

func (w *h1Response) WriteHeader(code int) {
	if w.wrote {
		return
	}
	if code < 100 || code > 999 {
		panic("invalid WriteHeader code " + strconv.Itoa(code))
	}
	if code >= 100 && code < 200 && code != http.StatusSwitchingProtocols {
		// Informational responses go out at once; the final one follows.
		_, _ = w.sc.bw.WriteString("HTTP/1.1 " + strconv.Itoa(code) + " " + http.StatusText(code) + "\r\n")
		_ = w.header.Write(w.sc.bw)
		_, _ = w.sc.bw.WriteString("\r\n")
		_ = w.sc.bw.Flush()
		return
	}
	w.wrote, w.status = true, code
	if cl := w.header.Get("Content-Length"); cl != "" {
		if v, err := strconv.ParseInt(cl, 10, 64); err == nil && v >= 0 {
			w.clen = v
		} else {
			w.header.Del("Content-Length")
		}
	}
}

// SetReadDeadline is http.ResponseController's, as net/http's servers
// have it.
func (w *h1Response) SetReadDeadline(t time.Time) error {
	w.sc.deadlineMoved = true
	return w.sc.c.SetReadDeadline(t)
}

func (w *h1Response) bodyAllowed() bool {
	return w.status != http.StatusNoContent && w.status != http.StatusNotModified && (w.status < 100 || w.status >= 200)
}

func (w *h1Response) Write(p []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	if w.broken {
		return 0, io.ErrClosedPipe
	}
	if !w.bodyAllowed() {
		return 0, http.ErrBodyNotAllowed
	}
	if w.clen >= 0 && w.written+int64(len(p)) > w.clen {
		return 0, http.ErrContentLength
	}
	w.written += int64(len(p))
	if w.head {
		return len(p), nil
	}
	if !w.sent && len(w.buf)+len(p) <= cap(w.buf) {
		w.buf = append(w.buf, p...)
		return len(p), nil
	}
	if !w.sent {
		w.sendHead(false, p)
	}
	if err := w.writeBody(w.buf); err != nil {
		return 0, err
	}
	w.buf = w.buf[:0]
	if err := w.writeBody(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (w *h1Response) writeBody(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	bw := w.sc.bw
	if w.chunked {
		_, _ = bw.WriteString(strconv.FormatInt(int64(len(p)), 16))
		_, _ = bw.WriteString("\r\n")
	}
	_, err := bw.Write(p)
	if w.chunked {
		_, err = bw.WriteString("\r\n")
	}
	if err != nil {
		w.broken = true
	}
	return err
}

// Flush sends the head and whatever body is held back.
func (w *h1Response) Flush() {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	if !w.sent {
		w.sendHead(false, nil)
	}
	if err := w.writeBody(w.buf); err == nil {
		w.buf = w.buf[:0]
	}
	if err := w.sc.bw.Flush(); err != nil {
		w.broken = true
	}
}

var (
	dateMu    sync.Mutex
	dateSec   int64
	dateValue string
)

// httpDate is the Date header for now, formatted once a second.
func httpDate() string {
	now := time.Now()
	dateMu.Lock()
	defer dateMu.Unlock()
	if now.Unix() != dateSec {
		dateSec, dateValue = now.Unix(), now.UTC().Format(http.TimeFormat)
	}
	return dateValue
}

// sendHead writes the status line and header. final means the handler
// has returned and the whole body is in buf; next is body about to follow
// buf (for sniffing a missing Content-Type).
func (w *h1Response) sendHead(final bool, next []byte) {
	w.sent = true
	h := w.header
	var exclude map[string]bool
	trailers := len(h["Trailer"]) > 0
	for k := range h {
		if len(k) > len(http.TrailerPrefix) && k[:len(http.TrailerPrefix)] == http.TrailerPrefix {
			if exclude == nil {
				exclude = map[string]bool{}
			}
			exclude[k], trailers = true, true
		}
	}
	if w.bodyAllowed() {
		sniff := w.buf
		if len(sniff) == 0 {
			sniff = next
		}
		if _, ok := h["Content-Type"]; !ok && len(sniff) > 0 && h.Get("Content-Encoding") == "" && h.Get("Transfer-Encoding") == "" {
			h["Content-Type"] = []string{http.DetectContentType(sniff)}
		}
		if trailers && !w.head {
			h.Del("Content-Length")
			w.clen = -1
		}
		// The framing is the server's: a handler's Transfer-Encoding
		// is replaced by chunking or the Content-Length.
		delete(h, "Transfer-Encoding")
		if w.clen < 0 {
			if final && !trailers && (!w.head || w.written > 0) {
				h["Content-Length"] = []string{strconv.FormatInt(w.written, 10)}
				w.clen = w.written
			} else if !w.head {
				w.chunked = true
				h["Transfer-Encoding"] = []string{"chunked"}
			}
		}
	} else {
		delete(h, "Content-Length")
		delete(h, "Transfer-Encoding")
		if w.status == http.StatusNotModified {
			delete(h, "Content-Type")
		}
	}
	if _, ok := h["Date"]; !ok {
		h["Date"] = []string{httpDate()}
	}
	if w.close || w.sc.closing.Load() || httpguts.HeaderValuesContainsToken(h["Connection"], "close") {
		w.close = true
		h["Connection"] = []string{"close"}
	}
	bw := w.sc.bw
	_, _ = bw.WriteString("HTTP/1.1 ")
	_, _ = bw.WriteString(codeLabel(w.status))
	_ = bw.WriteByte(' ')
	if text := http.StatusText(w.status); text != "" {
		_, _ = bw.WriteString(text)
	} else {
		_, _ = bw.WriteString("status code " + codeLabel(w.status))
	}
	_, _ = bw.WriteString("\r\n")
	if err := h.WriteSubset(bw, exclude); err != nil {
		w.broken = true
	}
	_, _ = bw.WriteString("\r\n")
}

// finish completes the response after the handler returns; false when
// the connection cannot carry another request.
func (w *h1Response) finish() bool {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	if !w.sent {
		w.sendHead(true, nil)
	}
	if err := w.writeBody(w.buf); err != nil {
		return false
	}
	w.buf = w.buf[:0]
	if w.chunked {
		_, _ = w.sc.bw.WriteString("0\r\n")
		w.writeTrailers()
		_, _ = w.sc.bw.WriteString("\r\n")
	}
	if err := w.sc.bw.Flush(); err != nil {
		return false
	}
	if w.broken || w.close {
		return false
	}
	// A body shorter than its declared length leaves the client waiting:
	// end the connection.
	return w.head || !w.bodyAllowed() || w.clen < 0 || w.written == w.clen
}

// writeTrailers sends the values of announced trailers and of
// http.TrailerPrefix keys.
func (w *h1Response) writeTrailers() {
	var t http.Header
	for _, v := range w.header["Trailer"] {
		for _, k := range splitComma(v) {
			k = textproto.CanonicalMIMEHeaderKey(trimOWS(k))
			if vv, ok := w.header[k]; ok {
				if t == nil {
					t = http.Header{}
				}
				t[k] = vv
			}
		}
	}
	for k, vv := range w.header {
		if len(k) > len(http.TrailerPrefix) && k[:len(http.TrailerPrefix)] == http.TrailerPrefix {
			if t == nil {
				t = http.Header{}
			}
			t[k[len(http.TrailerPrefix):]] = vv
		}
	}
	if t != nil {
		_ = t.Write(w.sc.bw)
	}
}

func splitComma(s string) []string {
	var out []string
	for {
		i := indexByte(s, ',')
		if i < 0 {
			return append(out, s)
		}
		out = append(out, s[:i])
		s = s[i+1:]
	}
}

// shutdown stops serving: idle connections close now, busy ones after
// their current response; it waits for them until ctx ends, then closes
// the rest.
func (s *h1Server) shutdown(ctx context.Context) {
	s.mu.Lock()
	s.closing.Store(true)
	for sc := range s.conns {
		if sc.idle.Load() {
			_ = sc.c.SetReadDeadline(aLongTimeAgo)
		}
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.doneOnce.Do(func() { close(s.done) })
		s.mu.Lock()
		for sc := range s.conns {
			sc.c.Close()
		}
		s.mu.Unlock()
		<-done
	}
	s.mu.Lock()
	if s.sweeping {
		s.sweeping = false
		close(s.sweepStop)
	}
	s.mu.Unlock()
}
