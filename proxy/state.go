package proxy

import (
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/authority/svidtls"
)

// state is one compiled Config: read-only once stored, swapped whole.
type state struct {
	cfg      *Config
	routes   map[string]*RouteConfig
	clusters map[string]*cluster
	byAddr   map[netip.AddrPort]*cluster // service address (serviceAddr) -> cluster
	// captured is the route of HTTP captured for each cluster with
	// service addresses: all of it to the cluster, retried on failed
	// connections.
	captured map[string]*Route
}

// cluster is a Cluster with its load balancer and its pool of HTTP/2
// connections to the peer sidecars.
type cluster struct {
	cfg      Cluster
	maxReq   int64
	maxRetry int64
	inflight atomic.Int64
	retrying atomic.Int64
	ejected  atomic.Int64 // > 0 while some endpoint may be ejected
	onEject  func(detector string)
	// rand replaces rand.IntN for the enforcing percentages in tests.
	rand func(n int) int
	ring []ringEntry // RING_HASH: sorted by hash
	eps  []*endpoint
	rr   atomic.Uint64
	// Peer sidecars are reached over mTLS in the protocol the request
	// came in: HTTP/2 (multiplexed on one connection per endpoint) for
	// h2 and gRPC, HTTP/1.1 keep-alive for HTTP/1 requests, whose pooled
	// connections cost less per request in Go's HTTP stacks than HTTP/2
	// streams (per-stream goroutines, one TLS record per frame, one
	// connection's read loop for all requests): make bench measured 1.5×
	// the throughput and 2/3 of the CPU per request.
	transport *h2Pool      // HTTP/2
	h1        *h1Transport // HTTP/1.1
	tcpTLS    *tls.Config
	dialer    *net.Dialer
	// conns bounds the connections of all of the above; tcpDial dials
	// spliced TCP under it.
	conns   *connLimit
	tcpDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// odStart is when outlier detection's sweeps began (unix ns): the
	// cluster's compile time.
	odStart int64
	// nextSweep is the next sweep time (unix ns) of the success-rate and
	// failure-percentage detectors; 0 when neither is enforced. evalMu
	// keeps sweeps (rare) from overlapping.
	nextSweep atomic.Int64
	evalMu    sync.Mutex
}

// endpoint is one peer sidecar; active counts its requests in flight for
// least-request balancing.
type endpoint struct {
	addr   string
	active atomic.Int64
	// Outlier detection state: consecutive 5xx and gateway failures, the
	// ejection backoff multiplier, and the sweep at which the last
	// ejection ends.
	fails, gwFails atomic.Int32
	backoff        atomic.Int32
	ejectedUntil   atomic.Int64 // unix nanoseconds; 0 when never ejected
	// window counts the tries of the current interval, countOne each and
	// countFailure more for a failure, so that one atomic add records a
	// try and one swap takes a consistent count; last is the interval
	// being judged, for the sweep only (under evalMu).
	window atomic.Uint64
	last   uint64
	// Active health check state, written by the checker only.
	unhealthy      atomic.Bool
	hcFail, hcPass int
}

// in reports whether the endpoint is in the pool at now: healthy and not
// ejected.
func (e *endpoint) in(now int64) bool {
	if e.unhealthy.Load() {
		return false
	}
	u := e.ejectedUntil.Load()
	return u == 0 || now >= u
}

const defaultConnectTimeout = 5 * time.Second

// compile builds the runtime state of cfg, reusing the transports (and so
// the pooled connections) of clusters whose peers and timeouts are
// unchanged in old.
func (p *Proxy) compile(cfg *Config, old *state) (*state, error) {
	st := &state{cfg: cfg, routes: map[string]*RouteConfig{}, clusters: map[string]*cluster{}, byAddr: map[netip.AddrPort]*cluster{}, captured: map[string]*Route{}}
	defer func() {
		for _, c := range cfg.Clusters {
			for _, a := range c.Addresses {
				if k, ok := serviceAddr(a); ok {
					st.byAddr[k] = st.clusters[c.Name]
				}
			}
			if len(c.Addresses) > 0 {
				st.captured[c.Name] = &Route{Prefix: "/", Clusters: []WeightedCluster{{Name: c.Name, Weight: 1}}, Retry: defaultRetry()}
			}
		}
	}()
	for i := range cfg.Routes {
		st.routes[cfg.Routes[i].Name] = &cfg.Routes[i]
	}
	for _, c := range cfg.Clusters {
		cl := &cluster{cfg: c, maxReq: 1024, maxRetry: 3, odStart: p.clock.Now().UnixNano()}
		name := c.Name
		cl.onEject = func(detector string) { p.metrics.ejections.WithLabelValues(name, detector).Inc() }
		if sweepsOn(c.OutlierDetection) {
			cl.nextSweep.Store(cl.odStart + cl.odInterval())
		}
		var maxConns, maxPending int
		if cb := c.CircuitBreakers; cb != nil {
			maxConns, maxPending = cb.MaxConnections, cb.MaxPendingRequests
			if cb.MaxRequests > 0 {
				cl.maxReq = int64(cb.MaxRequests)
			}
			if cb.MaxRetries > 0 {
				cl.maxRetry = int64(cb.MaxRetries)
			}
		}
		for _, ep := range c.Endpoints {
			cl.eps = append(cl.eps, &endpoint{addr: ep.Address})
		}
		if c.LBPolicy == RingHash {
			cl.ring = buildRing(cl.eps)
		}
		if old != nil {
			if o, ok := old.clusters[c.Name]; ok && slices.Equal(o.cfg.PeerIDs, c.PeerIDs) && o.cfg.ConnectTimeout == c.ConnectTimeout {
				cl.transport, cl.h1, cl.tcpTLS, cl.dialer, cl.conns, cl.tcpDial = o.transport, o.h1, o.tcpTLS, o.dialer, o.conns, o.tcpDial
				cl.conns.set(maxConns, maxPending)
				st.clusters[c.Name] = cl
				continue
			}
		}
		ids := make([]spiffeid.ID, 0, len(c.PeerIDs))
		for _, s := range c.PeerIDs {
			id, err := spiffeid.FromString(s)
			if err != nil {
				return nil, fmt.Errorf("cluster %s: peer id %q: %w", c.Name, s, err)
			}
			ids = append(ids, id)
		}
		authz := func(id spiffeid.ID) error {
			if slices.Contains(ids, id) {
				return nil
			}
			return fmt.Errorf("peer %s is not one of cluster %s's %v", id, c.Name, c.PeerIDs)
		}
		ct := time.Duration(c.ConnectTimeout)
		if ct <= 0 {
			ct = defaultConnectTimeout
		}
		cl.dialer = &net.Dialer{Timeout: ct, KeepAlive: 30 * time.Second}
		cl.conns = newConnLimit(func() { p.metrics.cxOverflows.WithLabelValues(name).Inc() },
			func() { p.metrics.overflows.WithLabelValues(name, "max_pending_requests").Inc() })
		cl.conns.set(maxConns, maxPending)
		// A request waits for a slot at most as long as for a connection.
		cl.tcpDial = cl.conns.dialer(poolTCP, cl.dialer, ct)
		h2 := svidtls.ClientConfig(p.src, p.src, authz, p.clock)
		h2.NextProtos = []string{"h2"}
		cl.tcpTLS = svidtls.ClientConfig(p.src, p.src, authz, p.clock)
		tr := &http.Transport{
			DialContext:         passDialed,
			TLSClientConfig:     h2,
			TLSHandshakeTimeout: handshakeTimeout,
			IdleConnTimeout:     90 * time.Second,
			// Bodies pass through untouched; compression is the app's.
			DisableCompression: true,
		}
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetHTTP2(true)
		cl.transport = newH2Pool(tr, cl.conns, cl.dialer)
		h1 := svidtls.ClientConfig(p.src, p.src, authz, p.clock)
		h1.NextProtos = []string{"http/1.1"}
		h1tr := &http.Transport{
			DialContext:         cl.conns.dialer(poolH1x, cl.dialer, ct),
			TLSClientConfig:     h1,
			TLSHandshakeTimeout: handshakeTimeout,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		}
		h1tr.Protocols = new(http.Protocols)
		h1tr.Protocols.SetHTTP1(true)
		cl.h1 = newH1Transport(h1tr, h1, cl.dialer, cl.conns)
		st.clusters[c.Name] = cl
	}
	return st, nil
}

// transportFor keeps the request's protocol on the hop between sidecars.
func (c *cluster) transportFor(r *http.Request) http.RoundTripper {
	if r.ProtoMajor == 2 || c.cfg.HTTP2 {
		return c.transport
	}
	return c.h1
}

func (c *cluster) closeIdle() {
	c.transport.CloseIdleConnections()
	c.h1.CloseIdleConnections()
}

// pick chooses an endpoint in the pool at now, avoiding not (the one that
// just failed) when there is another. When every endpoint is ejected the
// ejections are ignored (Envoy's panic mode): some traffic beats none.
// It returns nil for a cluster without endpoints.
func (c *cluster) pick(not *endpoint, now int64) *endpoint {
	if c.nextSweep.Load() != 0 {
		c.sweep(now)
	}
	eps := c.eps
	if c.ejected.Load() > 0 {
		healthy := make([]*endpoint, 0, len(eps))
		for _, e := range eps {
			if e.in(now) {
				healthy = append(healthy, e)
			}
		}
		switch len(healthy) {
		case len(eps):
			c.ejected.Store(0) // every ejection has ended
		case 0:
		default:
			eps = healthy
		}
	}
	return pickFrom(eps, not, c.cfg.LBPolicy, &c.rr)
}

func pickFrom(eps []*endpoint, not *endpoint, policy string, rr *atomic.Uint64) *endpoint {
	n := len(eps)
	switch {
	case n == 0:
		return nil
	case n == 1:
		return eps[0]
	}
	if policy == LeastRequest {
		// Power of two choices: two distinct random endpoints, the one
		// with fewer requests in flight wins.
		i := rand.IntN(n)
		j := rand.IntN(n - 1)
		if j >= i {
			j++
		}
		a, b := eps[i], eps[j]
		if a == not || (b != not && b.active.Load() < a.active.Load()) {
			return b
		}
		return a
	}
	e := eps[rr.Add(1)%uint64(n)]
	if e == not {
		e = eps[rr.Add(1)%uint64(n)]
	}
	return e
}

// retryCap is how many requests may be retrying at once: max_retries, or
// with a retry budget that share of the requests in flight (at least
// min_retry_concurrency).
func (c *cluster) retryCap() int64 {
	cb := c.cfg.CircuitBreakers
	if cb == nil || cb.RetryBudgetPercent <= 0 {
		return c.maxRetry
	}
	min := int64(cb.MinRetryConcurrency)
	if min <= 0 {
		min = 3
	}
	return max(min, int64(cb.RetryBudgetPercent*float64(c.inflight.Load())/100))
}

// ringEntry is one point of a hash ring.
type ringEntry struct {
	hash uint64
	ep   *endpoint
}

// ringPoints is how many points each endpoint gets on the ring: enough
// for an even spread over a few dozen endpoints.
const ringPoints = 128

func buildRing(eps []*endpoint) []ringEntry {
	ring := make([]ringEntry, 0, len(eps)*ringPoints)
	for _, e := range eps {
		for i := range ringPoints {
			ring = append(ring, ringEntry{hash: hashKey(e.addr + "_" + strconv.Itoa(i)), ep: e})
		}
	}
	slices.SortFunc(ring, func(a, b ringEntry) int { return cmp.Compare(a.hash, b.hash) })
	return ring
}

// hashKey is FNV-1a, 64 bits, followed by MurmurHash3's 64-bit
// finalizer: stable across processes, so every sidecar maps a key to the
// same endpoint. FNV-1a alone moves keys that differ only in their last
// bytes ("user-1", "user-2", or ring points "127.0.0.1:41001_7") by
// small multiples of its prime, about 2^40 apart on a 2^64 ring, so they
// bunched on one arc and every such key went to one endpoint; the
// finalizer spreads every input bit over the whole word.
func hashKey(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// pickHash walks the ring from key's point to the first endpoint in the
// pool at now that is not not; with none, it falls back to pick.
func (c *cluster) pickHash(key uint64, not *endpoint, now int64) *endpoint {
	if len(c.ring) == 0 {
		return c.pick(not, now)
	}
	i, _ := slices.BinarySearchFunc(c.ring, key, func(e ringEntry, k uint64) int { return cmp.Compare(e.hash, k) })
	for n := 0; n < len(c.ring); n++ {
		e := c.ring[(i+n)%len(c.ring)].ep
		if e != not && e.in(now) {
			return e
		}
	}
	return c.pick(not, now)
}

// route finds the route for a request (its Host, method, path without
// the query, and headers) in the named configuration: the first of the
// virtual host's routes that matches, as in Envoy.
func (st *state) route(name, host, method, path string, h http.Header) *Route {
	rc := st.routes[name]
	if rc == nil {
		return nil
	}
	authority := host
	if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.HasSuffix(host, "]") {
		host = host[:i]
	}
	var vh *VirtualHost
	for i := range rc.VirtualHosts {
		for _, d := range rc.VirtualHosts[i].Domains {
			if d == "*" && vh == nil || strings.EqualFold(d, host) {
				vh = &rc.VirtualHosts[i]
				if d != "*" {
					goto found
				}
			}
		}
	}
found:
	if vh == nil {
		return nil
	}
next:
	for i := range vh.Routes {
		r := &vh.Routes[i]
		if !r.matchPath(path) {
			continue
		}
		for j := range r.Headers {
			if !r.Headers[j].matches(method, authority, h) {
				continue next
			}
		}
		return r
	}
	return nil
}

// pickCluster chooses one of a route's clusters by weight.
func pickCluster(r *Route) string {
	if len(r.Clusters) == 1 {
		return r.Clusters[0].Name
	}
	var total uint64
	for _, c := range r.Clusters {
		total += uint64(c.Weight)
	}
	x := rand.Uint64N(total)
	for _, c := range r.Clusters {
		if x < uint64(c.Weight) {
			return c.Name
		}
		x -= uint64(c.Weight)
	}
	return r.Clusters[len(r.Clusters)-1].Name
}
