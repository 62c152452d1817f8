package proxy

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// errOverflow refuses a request that would wait for a connection while
// max_pending_requests others already do. Like Envoy's overflow it is
// answered 503 with x-envoy-overloaded, never retried, and says nothing
// about the endpoint to outlier detection.
var errOverflow = errors.New("upstream overflow: too many requests pending a connection")

// Envoy's default thresholds.
const (
	defaultMaxConnections = 1024
	defaultMaxPending     = 1024
)

// connPool names one of a cluster's connection pools. Each keeps
// connections to every endpoint; the limit counts them all.
type connPool uint8

const (
	poolH1  connPool = iota // h1Transport's own HTTP/1.1 pool
	poolH1x                 // its net/http fallback
	poolH2                  // the HTTP/2 Transport
	poolTCP                 // spliced TCP connections
)

type poolKey struct {
	pool connPool
	addr string
}

// connWaiter is a pending request. Its channel receives one grant: an
// idle HTTP/1.1 connection of its pool to its endpoint, handed over as
// it is released, a stream reserved on an HTTP/2 connection to it as
// one frees, or neither, a slot to dial with.
type connWaiter struct {
	key poolKey
	ch  chan grant
}

type grant struct {
	h1 *h1Conn
	h2 *h2Conn
}

// connLimit is a cluster's connection circuit breaker, Envoy's
// max_connections and max_pending_requests: it counts the cluster's
// upstream connections across its endpoints and pools, and queues, first
// come first served, the requests that find none idle when the count is
// at the bound. As in Envoy a pool may always open a connection to an
// endpoint it has none to, so that no request waits where nothing would
// ever serve it. The transports of a cluster share one, and it stays
// with them across configuration updates (set changes the bounds). It is
// safe for concurrent use; a connection costs a lock at dial and close,
// a request nothing unless it has to wait.
type connLimit struct {
	maxConns, maxPending atomic.Int64
	// pending counts the pending requests: the waiters, and those held
	// outside the queue (hold). It is read without the lock by the
	// release of every pooled connection, which looks for a waiter only
	// when there may be one.
	pending atomic.Int64
	// cxOverflow counts connections not opened for the bound (the
	// request waited or was refused), pendingOverflow refused requests.
	cxOverflow, pendingOverflow func()

	mu      sync.Mutex
	open    int64
	perPool map[poolKey]int
	waiters []*connWaiter
}

func newConnLimit(cxOverflow, pendingOverflow func()) *connLimit {
	l := &connLimit{cxOverflow: cxOverflow, pendingOverflow: pendingOverflow, perPool: map[poolKey]int{}}
	l.maxConns.Store(defaultMaxConnections)
	l.maxPending.Store(defaultMaxPending)
	return l
}

// set changes the bounds (zero takes Envoy's defaults). Connections over
// a lowered bound stay until they close; a raised one lets waiters dial.
func (l *connLimit) set(maxConns, maxPending int) {
	if maxConns <= 0 {
		maxConns = defaultMaxConnections
	}
	if maxPending <= 0 {
		maxPending = defaultMaxPending
	}
	l.maxConns.Store(int64(maxConns))
	l.maxPending.Store(int64(maxPending))
	l.mu.Lock()
	l.grantLocked()
	l.mu.Unlock()
}

// mayOpenLocked tells whether a connection of key may be opened now.
func (l *connLimit) mayOpenLocked(key poolKey) bool {
	return l.open < l.maxConns.Load() || l.perPool[key] == 0
}

func (l *connLimit) takeLocked(key poolKey) {
	l.open++
	l.perPool[key]++
}

// reserve takes a slot for a new connection of key (nil, nil), or queues
// the caller as a pending request (a waiter to wait on), or refuses it
// with errOverflow. h1Transport calls it holding its pool's lock, so
// that a connection released meanwhile finds the waiter.
func (l *connLimit) reserve(key poolKey) (*connWaiter, error) {
	return l.reserveHeld(key, false)
}

// reserveHeld is reserve for a caller that holds a pending place (hold)
// if held: a waiter it queues takes that place over.
func (l *connLimit) reserveHeld(key poolKey, held bool) (*connWaiter, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mayOpenLocked(key) {
		l.takeLocked(key)
		return nil, nil
	}
	l.cxOverflow()
	others := l.pending.Load()
	if held {
		others--
	}
	if others >= l.maxPending.Load() {
		l.pendingOverflow()
		return nil, errOverflow
	}
	w := &connWaiter{key: key, ch: make(chan grant, 1)}
	l.waiters = append(l.waiters, w)
	if !held {
		l.pending.Add(1)
	}
	return w, nil
}

// hold counts the caller as a pending request that waits outside the
// queue (for a connection being dialled, or for a new connection's
// stream limit), or refuses it with errOverflow. unhold gives the place
// back.
func (l *connLimit) hold() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.pending.Load() >= l.maxPending.Load() {
		l.pendingOverflow()
		return errOverflow
	}
	l.pending.Add(1)
	return nil
}

func (l *connLimit) unhold() { l.pending.Add(-1) }

// wait waits for w's grant until ctx ends: a connection or stream
// handed over, or neither with a slot taken for the caller to dial with.
// A grant that comes too late goes back: a connection or stream to
// giveBack, a slot to the next waiter.
func (l *connLimit) wait(ctx context.Context, w *connWaiter, giveBack func(grant)) (grant, error) {
	select {
	case g := <-w.ch:
		return g, nil
	case <-ctx.Done():
	}
	l.mu.Lock()
	if i := slices.Index(l.waiters, w); i >= 0 {
		l.waiters = slices.Delete(l.waiters, i, i+1)
		l.pending.Add(-1)
		l.mu.Unlock()
		return grant{}, ctx.Err()
	}
	l.mu.Unlock()
	if g := <-w.ch; g != (grant{}) {
		giveBack(g)
	} else {
		l.done(w.key)
	}
	return grant{}, ctx.Err()
}

// handoff gives c, an HTTP/1.1 connection of the h1 pool just released
// for reuse, to the first request waiting for one to its endpoint. The
// pool calls it holding its lock; it costs an atomic load when nobody
// waits.
func (l *connLimit) handoff(c *h1Conn) bool {
	if l.pending.Load() == 0 {
		return false
	}
	return l.give(poolKey{poolH1, c.addr}, func() (grant, bool) { return grant{h1: c}, true })
}

// waiting tells whether a request is pending for key.
func (l *connLimit) waiting(key poolKey) bool {
	if l.pending.Load() == 0 {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.ContainsFunc(l.waiters, func(w *connWaiter) bool { return w.key == key })
}

// give hands what take yields to the first request waiting on key, if
// there is one and take yields something.
func (l *connLimit) give(key poolKey, take func() (grant, bool)) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, w := range l.waiters {
		if w.key == key {
			g, ok := take()
			if !ok {
				return false
			}
			l.waiters = slices.Delete(l.waiters, i, i+1)
			l.pending.Add(-1)
			w.ch <- g
			return true
		}
	}
	return false
}

// done gives back the slot of a connection of key that closed (or was
// never opened), to a waiter if one may have it.
func (l *connLimit) done(key poolKey) {
	l.mu.Lock()
	l.open--
	if n := l.perPool[key] - 1; n > 0 {
		l.perPool[key] = n
	} else {
		delete(l.perPool, key)
	}
	l.grantLocked()
	l.mu.Unlock()
}

// grantLocked gives slots to the waiters that may open a connection now,
// oldest first.
func (l *connLimit) grantLocked() {
	for i := 0; i < len(l.waiters); {
		w := l.waiters[i]
		if !l.mayOpenLocked(w.key) {
			i++
			continue
		}
		l.waiters = slices.Delete(l.waiters, i, i+1)
		l.pending.Add(-1)
		l.takeLocked(w.key)
		w.ch <- grant{}
	}
}

// track makes conn count as one of key's until it is closed.
func (l *connLimit) track(conn net.Conn, key poolKey) net.Conn {
	return &countedConn{Conn: conn, l: l, key: key}
}

// dialer returns a DialContext for pool: it takes a slot (waiting at
// most wait for one, as a pending request) and dials. net/http's
// Transports dial on a context of their own while the request also
// waits for an idle connection, so a request that gets one leaves its
// dial waiting for a slot (or wait) and the connection, if dialed, pooled.
func (l *connLimit) dialer(pool connPool, d *net.Dialer, wait time.Duration) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		key := poolKey{pool, addr}
		w, err := l.reserve(key)
		if err != nil {
			return nil, err
		}
		if w != nil {
			wctx, cancel := context.WithTimeout(ctx, wait)
			_, err := l.wait(wctx, w, nil)
			cancel()
			if err != nil {
				return nil, err
			}
		}
		raw, err := d.DialContext(ctx, network, addr)
		if err != nil {
			l.done(key)
			return nil, err
		}
		return l.track(raw, key), nil
	}
}

// countedConn is an upstream connection counted by its cluster's
// connLimit until it is closed.
type countedConn struct {
	net.Conn
	l      *connLimit
	key    poolKey
	closed atomic.Bool
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	if c.closed.CompareAndSwap(false, true) {
		c.l.done(c.key)
	}
	return err
}

func (c *countedConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// SyscallConn lets the HTTP/1.1 pool's liveness check peek at the socket.
func (c *countedConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

// connSlot is called by get, holding t.mu, when no idle connection to
// addr is left: it takes a slot for a new connection (nil, nil), or waits
// as a pending request for a connection released to addr (returned) or
// for a slot, or refuses with errOverflow. It unlocks t.mu.
func (t *h1Transport) connSlot(ctx context.Context, addr string) (*h1Conn, error) {
	if t.lim == nil {
		t.mu.Unlock()
		return nil, nil
	}
	w, err := t.lim.reserve(poolKey{poolH1, addr})
	t.mu.Unlock()
	if w == nil {
		return nil, err
	}
	g, err := t.lim.wait(ctx, w, func(g grant) { t.release(g.h1, true) })
	return g.h1, err
}
