package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// h2Pool is a cluster's pool of HTTP/2 connections to its endpoints,
// under the cluster's connLimit with Envoy's semantics: a request that
// finds no connection with a free stream while the cluster is at
// max_connections is a pending request, and it goes out as soon as a
// stream frees on a connection to its endpoint or a connection slot
// frees, first come first served. net/http's pool cannot do this: it
// hands a waiting request only a newly dialled connection. The
// connections are net/http's own (Transport.NewClientConn); a state hook
// on each says when a stream frees or the connection ends.
type h2Pool struct {
	tr  *http.Transport // speaks HTTP/2 on the pool's connections; its own pool stays empty
	lim *connLimit
	d   *net.Dialer // with the connect timeout

	mu    sync.Mutex
	conns map[string][]*h2Conn // by endpoint address
	// wake is closed (and replaced) when a connection to the endpoint
	// is dialled, fails to be, or learns its stream limit.
	wake map[string]chan struct{}
	// getting counts requests that found no free stream and still look
	// for one: with pending, it lets a freed stream skip the pool when
	// nobody could want it, the common case.
	getting atomic.Int64
}

// h2Conn is one connection of the pool. Until the peer's SETTINGS are
// seen to have changed its stream limit, or a stream ends, or learnWait
// passes, it is unsettled: its limit may still be the client's initial
// guess rather than the peer's, and only one request is sent on it. A
// second one could exceed the peer's limit and be refused.
type h2Conn struct {
	addr    string
	cc      *http.ClientConn // nil while dialling
	dialed  time.Time
	err     error // why the dial failed
	probed  bool  // its one unsettled request was given
	settled atomic.Bool
	hooked  atomic.Bool // a state change waits for onState
}

// learnPoll is how often a new connection's stream limit is looked at
// until it is known: about a round trip.
const learnPoll = 2 * time.Millisecond

// h2InitialStreams is the stream limit Go's HTTP/2 client assumes
// until the peer's SETTINGS say otherwise.
const h2InitialStreams = 100

// learnWait is how long a new connection's stream limit is waited for
// at most: a peer whose limit is exactly the initial one says nothing
// the pool can see until a stream ends, and that may be a long one.
const learnWait = 250 * time.Millisecond

// learned tells whether c's stream limit is no longer the initial one,
// so the peer's SETTINGS were read, or has been waited for long enough.
func (c *h2Conn) learned() bool {
	return c.cc.Available()+c.cc.InFlight() != h2InitialStreams || time.Since(c.dialed) > learnWait
}

func newH2Pool(tr *http.Transport, lim *connLimit, d *net.Dialer) *h2Pool {
	return &h2Pool{tr: tr, lim: lim, d: d, conns: map[string][]*h2Conn{}, wake: map[string]chan struct{}{}}
}

// dialedKey carries a pool's dialled, counted connection to the
// Transport's DialContext, which only passes it on: the pool takes the
// slot and dials itself, so that it knows what to give back.
type dialedKey struct{}

func passDialed(ctx context.Context, _, _ string) (net.Conn, error) {
	if c, ok := ctx.Value(dialedKey{}).(net.Conn); ok {
		return c, nil
	}
	return nil, errors.New("h2 pool: dial outside the pool")
}

// maxRefusedRetries bounds how often a request the peer did not process
// is sent again.
const maxRefusedRetries = 3

func (p *h2Pool) RoundTrip(req *http.Request) (*http.Response, error) {
	for try := 0; ; try++ {
		c, err := p.get(req.Context(), req.URL.Host)
		if err != nil {
			return nil, err
		}
		resp, err := c.cc.RoundTrip(req) // takes the reserved stream
		if err == nil || try == maxRefusedRetries {
			return resp, err
		}
		// net/http's Transport sends again a request the peer did not
		// process, and so does the pool, if its body allows: in every
		// such case ClientConn.RoundTrip has closed the body, even one
		// it never read, so only an empty body or a new one from
		// GetBody can go again (as net/http's own rewind).
		if !unprocessed(err) {
			return nil, err
		}
		if req.Body != nil && req.Body != http.NoBody {
			if req.GetBody == nil {
				return nil, err
			}
			b, berr := req.GetBody()
			if berr != nil {
				return nil, err
			}
			r := *req
			r.Body = b
			req = &r
		}
	}
}

// unprocessed tells errors of ClientConn.RoundTrip for requests the
// peer did not process: a stream it refused (REFUSED_STREAM: it was over
// the peer's limit) or left beyond its GOAWAY, and a connection found
// unusable (a GOAWAY came, or it closed) before the stream began.
// net/http's Transport retries these by its unexported errors; Go 1.26
// exports neither them nor a type for them, so only their text is
// visible here, and TestH2RefusedStreamSentAgain and
// TestH2GoAwayAfterReserveSentAgain fail if it changes. A new
// connection that closed before its first stream began ("could not be
// established") is not sent again, as net/http does not: a peer that
// closes every new connection would be dialled again and again.
func unprocessed(err error) bool {
	s := err.Error()
	return strings.Contains(s, "http2: client conn not usable") ||
		strings.Contains(s, "REFUSED_STREAM") ||
		strings.Contains(s, "http2: Transport received Server's graceful shutdown GOAWAY")
}

// get returns a connection to addr with a stream reserved for the
// caller: a free stream of a settled connection, else the one request of
// a new connection, else a new connection if the bound allows, else one
// handed over as a pending request.
func (p *h2Pool) get(ctx context.Context, addr string) (*h2Conn, error) {
	key := poolKey{poolH2, addr}
	counted := false
	uncount := func() {
		if counted {
			counted = false
			p.getting.Add(-1)
		}
	}
	defer uncount()
	// From when it finds no free stream until it has one the caller is
	// a pending request, as in Envoy, whether it waits in the limit's
	// queue (which then counts it) or for a connection on its way: a
	// burst at max_connections cannot pile up behind one dial.
	held := false
	defer func() {
		if held {
			p.lim.unhold()
		}
	}()
	dialed := false // the caller had a connection dialled: it waits for that
	p.mu.Lock()
	for {
		var dialing, learning *h2Conn
		// Requests already pending for addr go first: a stream freed
		// meanwhile is theirs (onState hands it over).
		queue := !dialed && p.lim.waiting(key)
		var closed []*h2Conn
		for _, c := range p.conns[addr] {
			if queue {
				break
			}
			switch {
			case c.cc == nil:
				dialing = c
			case c.settled.Load():
				if c.cc.Reserve() == nil {
					p.mu.Unlock()
					return c, nil
				}
				if c.cc.Err() != nil {
					// Closed by the peer while idle: no state hook
					// said so.
					closed = append(closed, c)
				}
			case !c.probed:
				if c.cc.Reserve() == nil {
					c.probed = true
					p.mu.Unlock()
					return c, nil
				}
			default:
				learning = c
			}
		}
		for _, c := range closed {
			p.removeLocked(c)
		}
		if !counted {
			// From now on a freed stream must look for this request;
			// one freed before is found by looking again.
			p.getting.Add(1)
			counted = true
			continue
		}
		if !held {
			if err := p.lim.hold(); err != nil {
				p.mu.Unlock()
				return nil, err
			}
			held = true
		}
		if dialing != nil || learning != nil {
			// Rather than open another connection, wait for the one
			// on its way, or for the peer's stream limit on a new one.
			wake := p.wakeLocked(addr)
			p.mu.Unlock()
			select {
			case <-wake:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			p.mu.Lock()
			if dialing != nil && dialing.err != nil {
				p.mu.Unlock()
				return nil, dialing.err
			}
			continue
		}
		w, err := p.lim.reserveHeld(key, true)
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		if w == nil {
			p.dialLocked(ctx, addr)
			dialed = true
			continue
		}
		held = false // the queue counts it now
		p.mu.Unlock()
		uncount()
		g, err := p.lim.wait(ctx, w, func(g grant) { g.h2.cc.Release() })
		if err != nil {
			return nil, err
		}
		if g.h2 != nil {
			return g.h2, nil
		}
		// Back to looking: a stream freed from now on must see it. It
		// is still pending, now for the connection it dials.
		p.getting.Add(1)
		counted = true
		p.lim.pending.Add(1)
		held = true
		p.mu.Lock()
		p.dialLocked(ctx, addr)
		dialed = true
	}
}

func (p *h2Pool) wakeLocked(addr string) chan struct{} {
	ch := p.wake[addr]
	if ch == nil {
		ch = make(chan struct{})
		p.wake[addr] = ch
	}
	return ch
}

func (p *h2Pool) wakeUpLocked(addr string) {
	if ch := p.wake[addr]; ch != nil {
		close(ch)
		delete(p.wake, addr)
	}
}

// dialLocked starts a connection to addr with the slot the caller took.
// The dial is the pool's, not the request's: it goes on if the request
// ends, and its connection serves the next ones.
func (p *h2Pool) dialLocked(ctx context.Context, addr string) {
	c := &h2Conn{addr: addr}
	p.conns[addr] = append(p.conns[addr], c)
	ctx = context.WithoutCancel(ctx)
	go func() {
		cc, err := p.dial(ctx, addr)
		p.mu.Lock()
		defer p.mu.Unlock()
		if err != nil {
			c.err = err
			p.removeLocked(c)
		} else {
			c.cc, c.dialed = cc, time.Now()
		}
		p.wakeUpLocked(addr)
		if cc == nil {
			return
		}
		cc.SetStateHook(func(*http.ClientConn) { p.stateChanged(c) })
		// A lowered stream limit runs no state hook: look for it
		// until it is known.
		go func() {
			for !c.settled.Load() {
				if c.cc.Err() != nil || c.learned() {
					p.onState(c)
					return
				}
				time.Sleep(learnPoll)
			}
		}()
	}()
}

// dial opens a connection to addr in the slot taken for it.
func (p *h2Pool) dial(ctx context.Context, addr string) (*http.ClientConn, error) {
	key := poolKey{poolH2, addr}
	raw, err := p.d.DialContext(ctx, "tcp", addr)
	if err != nil {
		p.lim.done(key)
		return nil, err
	}
	conn := p.lim.track(raw, key)
	cc, err := p.tr.NewClientConn(context.WithValue(ctx, dialedKey{}, conn), "https", addr)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return cc, nil
}

func (p *h2Pool) removeLocked(c *h2Conn) {
	cs := p.conns[c.addr]
	if i := slices.Index(cs, c); i >= 0 {
		cs = slices.Delete(cs, i, i+1)
	}
	if len(cs) == 0 {
		delete(p.conns, c.addr)
	} else {
		p.conns[c.addr] = cs
	}
}

// stateChanged is c's state hook. ClientConn may run it from within
// Reserve, which the pool calls holding its lock, so the work is done
// by a goroutine of its own; changes meanwhile are taken in by that
// run, which reads the state then.
func (p *h2Pool) stateChanged(c *h2Conn) {
	if c.settled.Load() && p.lim.pending.Load() == 0 && p.getting.Load() == 0 && c.cc.Err() == nil {
		return // nobody could want the stream
	}
	if c.hooked.CompareAndSwap(false, true) {
		go func() {
			c.hooked.Store(false)
			p.onState(c)
		}()
	}
}

// onState hands c's free streams to the requests pending for its
// endpoint, oldest first, and drops c from the pool once it has ended.
func (p *h2Pool) onState(c *h2Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.cc.Err() != nil {
		p.removeLocked(c)
		p.wakeUpLocked(c.addr)
		return
	}
	if !c.settled.Load() {
		c.settled.Store(true)
		p.wakeUpLocked(c.addr)
	}
	key := poolKey{poolH2, c.addr}
	for p.lim.give(key, func() (grant, bool) { return grant{h2: c}, c.cc.Reserve() == nil }) {
	}
}

// CloseIdleConnections closes the connections without a request.
func (p *h2Pool) CloseIdleConnections() {
	var idle []*h2Conn
	p.mu.Lock()
	for _, cs := range p.conns {
		for _, c := range cs {
			if c.cc != nil && c.cc.InFlight() == 0 {
				idle = append(idle, c)
			}
		}
	}
	for _, c := range idle {
		p.removeLocked(c)
	}
	p.mu.Unlock()
	for _, c := range idle {
		c.cc.Close()
	}
}

var _ http.RoundTripper = (*h2Pool)(nil)
