package proxy

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"time"
)

// A client that goes away while the fast HTTP/1.1 server's handler waits
// for its answer is noticed by a watcher, so that the request is
// cancelled upstream (and, the upstream connection being closed, by the
// next hop too) instead of running on for nobody while it holds its
// connection and its circuit breaker slots.
//
// net/http's server reads in the background after every request: a
// goroutine hand-off per request, which the fast path exists to avoid.
// Here nothing is done for a request answered within watchAfter: the
// connection's goroutine marks the request as waiting (an atomic store,
// when the body has been read to its end or there is none) and unmarks it
// when the handler returns (a compare-and-swap). One sweeper per server,
// running while it has connections, looks at every connection each
// watchAfter and starts a watcher for a request it found waiting, the
// same one, at its previous look: a request waiting between one and two
// watchAfter gets one. A per-connection timer would cost a timer per
// request; a per-connection reader, net/http's goroutine per request.
//
// The watcher reads ahead through the connection's own reader (its
// buffer is idle: the body is read, the next head not yet), so bytes of a
// pipelined request stay in the reader, in front of what comes next.
// Reaching the connection's end (EOF, a reset, also a half-close: a
// client that shut its sending side down counts as gone, as in nginx and
// Envoy by default) cancels the connection's context and interrupts the
// upstream exchange waiting under it. When the handler returns, the
// watcher is stopped with a read deadline in the past, which for TCP and
// tls.Conn alike ends the read without consuming anything or leaving the
// connection broken, and waited for.

// DefaultWatchClientAfter is how long a request waits before its client
// is watched, unless Options.WatchClientAfter says otherwise.
const DefaultWatchClientAfter = 500 * time.Millisecond

// The low bits of h1ServerConn.wait; the rest is the request's number.
const (
	waitNone    = 0 // in the head, the body, or between requests
	waitWaiting = 1 // the handler waits: nothing reads the connection
	waitWatched = 2 // a watcher reads it
	waitBits    = 3
)

// startWait marks request seq as waiting.
func (sc *h1ServerConn) startWait(seq uint64) {
	sc.wait.Store(seq<<2 | waitWaiting)
}

// endWait ends the request's wait once its handler has returned: a
// watcher is stopped and waited for, so that the reader is the
// connection's again. It reports whether the client went away.
func (sc *h1ServerConn) endWait() bool {
	v := sc.wait.Load()
	switch v & waitBits {
	case waitNone:
		return false
	case waitWaiting:
		if sc.wait.CompareAndSwap(v, v&^waitBits) {
			return false
		}
		v = sc.wait.Load() // the sweeper started a watcher
	}
	sc.wmu.Lock()
	sc.wstop = true
	_ = sc.c.SetReadDeadline(aLongTimeAgo)
	sc.wmu.Unlock()
	sc.wwg.Wait()
	gone := sc.wgone
	sc.wstop, sc.wgone = false, false
	_ = sc.c.SetReadDeadline(time.Time{})
	sc.deadlineMoved = true // the loop sets the idle deadline anew
	sc.wait.Store(v &^ waitBits)
	return gone
}

// sweep starts watchers for requests that have waited long enough, until
// the server has no connections left or shuts down.
func (s *h1Server) sweep() {
	t := time.NewTicker(s.watchAfter)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-s.sweepStop:
			return
		}
		s.mu.Lock()
		if len(s.conns) == 0 {
			s.sweeping = false
			s.mu.Unlock()
			return
		}
		for sc := range s.conns {
			v := sc.wait.Load()
			if v&waitBits == waitWaiting && v == sc.seen {
				// Added before the watcher is visible: endWait waits
				// once it sees one.
				sc.wwg.Add(1)
				if sc.wait.CompareAndSwap(v, v&^waitBits|waitWatched) {
					s.watched.Add(1)
					go s.watch(sc)
				} else {
					sc.wwg.Done()
				}
			}
			sc.seen = v
		}
		s.mu.Unlock()
	}
}

// watch reads ahead on sc until its client goes away or endWait stops it.
func (s *h1Server) watch(sc *h1ServerConn) {
	defer sc.wwg.Done()
	sc.wmu.Lock()
	if sc.wstop {
		sc.wmu.Unlock()
		return
	}
	// The idle deadline would end the watch of a long wait.
	_ = sc.c.SetReadDeadline(time.Time{})
	sc.wmu.Unlock()
	for {
		n := sc.br.Buffered()
		if n == sc.br.Size() {
			return // pipelined requests fill the buffer: the client is there
		}
		_, err := sc.br.Peek(n + 1)
		if err == nil {
			s.readAhead.Add(int64(sc.br.Buffered() - n))
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return
		}
		sc.wgone = true
		sc.down.end()
		// A connection the server closed (shutdown's end) is not a
		// client gone.
		if !errors.Is(err, net.ErrClosed) && s.gone != nil {
			s.gone.Inc()
		}
		return
	}
}

// downCtx is the context of a fast-path connection's requests, made once
// per connection: the connection's values, cancelled when a watcher finds
// the client gone. Its requests' upstream exchanges do not watch Done
// (a context.AfterFunc per request): one waiting for its answer under
// onlyDeadline registers its connection in up instead, which end
// interrupts.
type downCtx struct {
	context.Context // a cancelCtx: children attach to it directly
	cancel          context.CancelFunc
	up              atomic.Pointer[h1Conn]
}

func newDownCtx(parent context.Context) *downCtx {
	c := &downCtx{}
	c.Context, c.cancel = context.WithCancel(parent)
	return c
}

// onlyDeadline: the context has no deadline, and ends early only by end,
// which interrupts the exchange registered in up.
func (c *downCtx) onlyDeadline() (time.Time, bool) { return time.Time{}, true }

func (c *downCtx) downstream() *downCtx { return c }

// end cancels the connection's requests.
func (c *downCtx) end() {
	c.cancel()
	if u := c.up.Swap(nil); u != nil {
		_ = u.c.SetDeadline(aLongTimeAgo)
	}
}

// downstreamCtx is a context that may carry a downCtx for the upstream
// exchange to register with (routeCtx carries its parent's).
type downstreamCtx interface {
	downstream() *downCtx
}

// hook registers c as ctx's connection's waiting exchange; nil when ctx
// has none to register with (or another exchange is registered). The
// caller checks ctx.Err() afterwards: a client gone before c was
// registered has not interrupted it.
func hook(ctx context.Context, c *h1Conn) *downCtx {
	dc, ok := ctx.(downstreamCtx)
	if !ok {
		return nil
	}
	d := dc.downstream()
	if d == nil || !d.up.CompareAndSwap(nil, c) {
		return nil
	}
	return d
}

// unhook takes hc off c (nil: none); false when end has taken it (its deadline is, or
// is about to be, in the past: the connection cannot be reused).
func (c *downCtx) unhook(hc *h1Conn) bool {
	return c == nil || c.up.CompareAndSwap(hc, nil)
}
