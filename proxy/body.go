package proxy

import (
	"errors"
	"io"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/writmesh/writ/enforcer"
)

// heldBody is the part of a request's body held back for its check, as
// Envoy's ext_authz filter buffers it with with_request_body. It is not
// safe for concurrent use; one request owns it.
type heldBody struct {
	buf     []byte
	partial bool // more of the body follows what buf holds
	pack    bool // sent as raw_body, not body
	// budget, if set, has cap(buf) of its bytes taken for this body
	// until release.
	budget *bodyBudget
	// replay is the body put back into the request.
	replay *replayBody
}

// DefaultMaxHeldBodyBytesTotal is Options.MaxHeldBodyBytesTotal's
// default: 16 bodies at the largest max_request_bytes, or a thousand at
// 64 KiB.
const DefaultMaxHeldBodyBytesTotal = 64 << 20

// errHoldBudget is a body that cannot be held because the bodies held by
// all requests are at Options.MaxHeldBodyBytesTotal.
var errHoldBudget = errors.New("request bodies held for policy are at the proxy's limit")

// bodyBudget bounds the bytes of all held bodies together. Each request
// may hold up to max_request_bytes, so without it many connections
// sending bodies could make the proxy hold any amount. It is safe for
// concurrent use.
type bodyBudget struct {
	max       int64
	used      atomic.Int64
	bytes     prometheus.Gauge
	overflows prometheus.Counter
}

// take reserves n bytes, or reports that they would take the total over
// max (counted as an overflow). Never waiting keeps requests from
// queueing behind held bodies without bound.
func (b *bodyBudget) take(n int64) bool {
	for {
		u := b.used.Load()
		if u+n > b.max {
			b.overflows.Inc()
			return false
		}
		if b.used.CompareAndSwap(u, u+n) {
			b.bytes.Add(float64(n))
			return true
		}
	}
}

func (b *bodyBudget) give(n int64) {
	b.used.Add(-n)
	b.bytes.Sub(float64(n))
}

// grow gives h's buffer capacity n (at least its length), taking the
// added bytes from its budget first; false if the budget has not them.
func (h *heldBody) grow(n int64) bool {
	if h.budget != nil && !h.budget.take(n-int64(cap(h.buf))) {
		return false
	}
	nb := make([]byte, len(h.buf), n)
	copy(nb, h.buf)
	h.buf = nb
	return true
}

// release gives h's bytes back to its budget and stops moving the read
// deadline for the rest of the body. The request calls it when it ends,
// since the buffer is replayed to the app until then; it is safe on a nil
// h and more than once.
func (h *heldBody) release() {
	if h == nil {
		return
	}
	if h.replay != nil {
		h.replay.unwatch()
	}
	if h.budget != nil {
		h.budget.give(int64(cap(h.buf)))
		h.budget = nil
	}
}

// errBodyTooLarge is a body over max_request_bytes without
// allow_partial_message: Envoy answers it 413 before any check.
var errBodyTooLarge = errors.New("request body larger than max_request_bytes")

// firstBodyRead is the first buffer for a body of unknown length, and
// firstDeclaredRead for one of declared length: most bodies are small,
// max_request_bytes may be megabytes, and a client's declared length is
// only a claim, so the buffer grows (by doubling) as bytes arrive rather
// than being allocated whole before any has.
const (
	firstBodyRead     = 4 << 10
	firstDeclaredRead = 64 << 10
)

// holdBody reads up to rb.MaxBytes of r's body before the check and puts
// back a body that replays them, then streams the rest, so the app gets
// every byte. A request without a body (or an upgrade, whose body is the
// tunnel) holds nothing and returns nil, as Envoy buffers only a stream
// that has not ended with its headers. Without AllowPartialMessage a body
// over the limit is errBodyTooLarge (a declared length at once, an
// undeclared one once a byte beyond the limit arrives); with it, the
// first MaxBytes are held and partial is set. A body of unknown length
// that fills the limit exactly counts as partial: waiting to see its end
// would hold a client that streams until it is answered.
//
// The buffer's bytes are taken from budget (if not nil) before it is
// made or grown, so the bytes all requests hold stay bounded; a body
// that does not fit is errHoldBudget. On success the caller releases the
// held body when the request ends; on an error nothing stays taken.
func holdBody(r *http.Request, rb RequestBody, budget *bodyBudget) (*heldBody, error) {
	if !hasBody(r) {
		return nil, nil
	}
	limit := int64(rb.MaxBytes)
	if r.ContentLength > limit && !rb.AllowPartialMessage {
		return nil, errBodyTooLarge
	}
	want := limit
	if r.ContentLength > 0 && r.ContentLength < want {
		want = r.ContentLength
	}
	n := min(want, firstDeclaredRead)
	if r.ContentLength < 0 {
		n = min(want, firstBodyRead)
	}
	hb := &heldBody{pack: rb.PackAsBytes, budget: budget}
	// Given back on every way out but success, a panic in a body's Read
	// included.
	held := false
	defer func() {
		if !held {
			hb.release()
		}
	}()
	if !hb.grow(n) {
		return nil, errHoldBudget
	}
	eof := false
	for int64(len(hb.buf)) < want {
		if len(hb.buf) == cap(hb.buf) && !hb.grow(min(2*int64(cap(hb.buf)), want)) {
			return nil, errHoldBudget
		}
		m, err := r.Body.Read(hb.buf[len(hb.buf):cap(hb.buf)])
		hb.buf = hb.buf[:len(hb.buf)+m]
		if err == io.EOF {
			eof = true
			break
		}
		if err != nil {
			return nil, err
		}
	}
	switch {
	case eof || int64(len(hb.buf)) < limit:
		// All of it (a declared length shorter than the limit, read).
	case r.ContentLength > 0:
		hb.partial = r.ContentLength > limit
	case rb.AllowPartialMessage:
		hb.partial = true
	default:
		// Unknown length at the limit: it must end here to be checked.
		var probe [1]byte
		m, err := io.ReadFull(r.Body, probe[:])
		if m > 0 {
			return nil, errBodyTooLarge
		}
		if err != io.EOF {
			return nil, err
		}
	}
	hb.replay = &replayBody{held: hb.buf, rest: r.Body}
	r.Body = hb.replay
	held = true
	return hb, nil
}

// hasBody tells a request whose body may be held: not one that ended
// with its headers, nor an upgrade, whose body is the tunnel.
func hasBody(r *http.Request) bool {
	return r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 && r.Header.Get("Upgrade") == "" && r.Method != http.MethodConnect
}

// bodyHoldTimeout bounds the wait for a held body. Before the check no
// app's timeout applies and the servers' read deadlines are off (or the
// idle one), so a client sending its body slowly, or stopping, would
// otherwise keep the request, its buffer and its goroutine, and delay a
// drain, for as long as it likes. A variable for tests.
var bodyHoldTimeout = 30 * time.Second

// bodyIdleTimeout bounds each wait for more of a body whose first part
// was held (allow_partial_message): the rest streams to the app after the
// check, and a client that stops sending it would otherwise keep the
// request, its goroutine and the connection for good, since the hold's
// deadline is gone and the servers' read deadlines are off. It is the
// fast path's idle timeout, under which its other bodies read, but it
// restarts with every read, so a large body that keeps coming is never
// cut. A variable for tests.
var bodyIdleTimeout = h1IdleTimeout

// holdBody holds r's body for the check when the listener's ext_authz
// asks for it (with_request_body), under bodyHoldTimeout; by default it
// holds nothing.
func (l *inboundListener) holdBody(w http.ResponseWriter, r *http.Request) (*heldBody, error) {
	if l.cfg.RequestBody.MaxBytes == 0 || !hasBody(r) {
		return nil, nil
	}
	rc := http.NewResponseController(w)
	if err := rc.SetReadDeadline(time.Now().Add(bodyHoldTimeout)); err != nil {
		return nil, err
	}
	hb, err := holdBody(r, l.cfg.RequestBody, l.p.bodies)
	switch {
	case err != nil:
	case hb != nil && hb.partial:
		// A controller of its own: rc stays on the stack for the common
		// whole body.
		hb.replay.watch(http.NewResponseController(w))
	default:
		// All of the body is in: no read of it waits on the client.
		_ = rc.SetReadDeadline(time.Time{})
	}
	// A refused body keeps the hold's deadline: the server still reads
	// what is left of it (the fast path drains a declared length before
	// closing), which a client claiming a huge length would otherwise
	// stretch without end.
	return hb, err
}

// attach puts the held body into req as Envoy does: body (raw_body with
// pack_as_bytes), the x-envoy-auth-partial-body header, and as size the
// body bytes received before the check (Envoy's bytesReceived, not the
// declared length). A nil h attaches nothing.
func (h *heldBody) attach(req *authv3.CheckRequest) {
	if h == nil {
		return
	}
	hr := req.GetAttributes().GetRequest().GetHttp()
	if h.pack {
		hr.RawBody = h.buf
	} else {
		// Shares buf without a copy: nothing writes to buf once it is
		// held (the replay only reads it).
		hr.Body = unsafe.String(unsafe.SliceData(h.buf), len(h.buf))
	}
	hr.Size = int64(len(h.buf))
	partial := "false"
	if h.partial {
		partial = "true"
	}
	// Set over any the client sent, as Envoy does.
	hr.Headers[enforcer.PartialBodyHeader] = partial
}

// replayBody is a request body whose first bytes were read for the
// check: it gives them again, then the rest from the connection. Read is
// for one goroutine (a transport's); watch and unwatch may run beside it.
type replayBody struct {
	held []byte
	rest io.ReadCloser
	// watched is set before the rest is read and never changes: reads
	// of rest then take mu to move rc's read deadline.
	watched bool
	mu      sync.Mutex
	// rc is the request's, until the request ends (nil after): a
	// transport may still read the body then, and the response
	// controller's writer may serve another request by then.
	rc    *http.ResponseController
	until time.Time // the read deadline last set
	// ended is set, by Read alone, once rest has returned an error.
	ended bool
}

// watch puts the reads of the rest under bodyIdleTimeout, starting now.
func (b *replayBody) watch(rc *http.ResponseController) {
	b.watched, b.rc = true, rc
	b.until = time.Now().Add(bodyIdleTimeout)
	_ = rc.SetReadDeadline(b.until)
}

// unwatch stops moving the deadline; the last one set stays, so that
// what a server still reads of the body (the fast path discards the
// unread rest) stays bounded too.
func (b *replayBody) unwatch() {
	if !b.watched {
		return
	}
	b.mu.Lock()
	b.rc = nil
	b.mu.Unlock()
}

// idleSlack is how far the idle deadline may lag: it moves at most once
// per slack, as the fast path's idle deadline does, not on every read.
func idleSlack() time.Duration {
	return min(h1IdleSlack, bodyIdleTimeout/4)
}

func (b *replayBody) Read(p []byte) (int, error) {
	if len(b.held) > 0 {
		n := copy(p, b.held)
		b.held = b.held[n:]
		return n, nil
	}
	if b.watched && !b.ended {
		b.mu.Lock()
		if now := time.Now(); b.rc != nil && now.Add(bodyIdleTimeout).Sub(b.until) >= idleSlack() {
			b.until = now.Add(bodyIdleTimeout)
			_ = b.rc.SetReadDeadline(b.until)
		}
		b.mu.Unlock()
	}
	n, err := b.rest.Read(p)
	if err != nil {
		// Not moved again once the body is over: net/http's HTTP/1.1
		// server clears the deadline then for a background read that
		// cancels the request if it fails, so a read after the end
		// (transports make one) must not set it again.
		b.ended = true
	}
	return n, err
}

func (b *replayBody) Close() error { return b.rest.Close() }

// writeBodyRefused answers a request whose body could not be held as
// Envoy does: 413 for one too large, 408 for one too slow, 400 for one
// that could not be read; and 503 for one the proxy has no room to hold
// now (Envoy has no such bound), which the client may retry.
func writeBodyRefused(w http.ResponseWriter, err error) {
	status, msg := http.StatusBadRequest, "Bad Request"
	switch {
	case errors.Is(err, errBodyTooLarge):
		status, msg = http.StatusRequestEntityTooLarge, "Payload Too Large"
	case errors.Is(err, errHoldBudget):
		status, msg = http.StatusServiceUnavailable, "Service Unavailable: request bodies held for policy checks are at this proxy's limit; retry later"
	case errors.Is(err, os.ErrDeadlineExceeded):
		status, msg = http.StatusRequestTimeout, "Request Timeout"
	}
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Connection", "close")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg)
}
