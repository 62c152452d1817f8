// Package proxy is Writ's sidecar data plane: inbound mTLS termination with
// SPIFFE peer checks and an in-process authorization decision for every
// request, outbound routing, load balancing and retries over mTLS HTTP/2
// to peer sidecars, metrics, access logs and an admin port.
//
// Its configuration is a Config, shaped like the Envoy resources writd
// serves over xDS; today it is static (YAML and flags) and Proxy.Update is
// the seam where the xDS client will push new ones.
//
// It imports enforcer and authority/svidtls; only cmd/writ-proxy and tests
// import it.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/writmesh/writ/enforcer"
)

// Source gives the workload's SVID and the trust bundle. go-spiffe's
// workloadapi.X509Source is one; it must be safe for concurrent use and
// may rotate underneath the proxy.
type Source interface {
	x509svid.Source
	x509bundle.Source
}

// Options configure a Proxy. Source is required.
type Options struct {
	Source Source
	// Enforcer decides every inbound request. Without one every inbound
	// request and connection is denied (default deny).
	Enforcer *enforcer.Enforcer
	// Registry receives the proxy's metrics and is served on /metrics;
	// nil makes a new one.
	Registry *prometheus.Registry
	// AccessLog receives one JSON line per request or connection; nil
	// discards them.
	AccessLog io.Writer
	// DrainTimeout bounds how long in-flight requests may finish after
	// Run's context ends; zero is 10 s.
	DrainTimeout time.Duration
	Clock        clockwork.Clock
	Log          *slog.Logger
	// OTLPTracesURL, when set, receives a span per HTTP request over
	// OTLP/HTTP (protobuf), e.g. http://collector:4318/v1/traces; see
	// OTLPTracesURL for building it from OTEL_EXPORTER_OTLP_* variables.
	OTLPTracesURL string
	// ServiceName is the spans' service.name; empty is "writ-proxy".
	ServiceName string
}

// Proxy is a running data plane. It is safe for concurrent use.
type Proxy struct {
	src      Source
	td       spiffeid.TrustDomain
	enf      *enforcer.Enforcer
	reg      *prometheus.Registry
	metrics  *metrics
	alog     *accessLog
	traces   *traceExporter
	drain    time.Duration
	clock    clockwork.Clock
	log      *slog.Logger
	state    atomic.Pointer[state]
	inbound  []*inboundListener
	outbound []*outboundListener
	// tcpConns tracks spliced connections so that drain can end them.
	tcpMu    sync.Mutex
	tcpConns map[net.Conn]struct{}
	tcpWG    sync.WaitGroup
}

// New checks cfg, binds all of its listeners and returns a Proxy that
// serves them once Run is called. A Proxy that is not Run must be Closed.
func New(cfg *Config, opts Options) (*Proxy, error) {
	if opts.Source == nil {
		return nil, errors.New("proxy: no svid source")
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	svid, err := opts.Source.GetX509SVID()
	if err != nil {
		return nil, fmt.Errorf("proxy: svid: %w", err)
	}
	if opts.Registry == nil {
		opts.Registry = prometheus.NewRegistry()
	}
	if opts.AccessLog == nil {
		opts.AccessLog = io.Discard
	}
	if opts.DrainTimeout <= 0 {
		opts.DrainTimeout = 10 * time.Second
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(opts.Registry)
	if err != nil {
		return nil, err
	}
	p := &Proxy{
		src: opts.Source, td: svid.ID.TrustDomain(), enf: opts.Enforcer, reg: opts.Registry, metrics: m,
		alog: newAccessLog(opts.AccessLog), drain: opts.DrainTimeout, clock: opts.Clock, log: opts.Log,
		tcpConns: map[net.Conn]struct{}{},
	}
	if opts.OTLPTracesURL != "" {
		u, err := OTLPTracesURL("", opts.OTLPTracesURL)
		if err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
		if opts.ServiceName == "" {
			opts.ServiceName = "writ-proxy"
		}
		if p.traces, err = newTraceExporter(u, opts.ServiceName, opts.Registry); err != nil {
			return nil, err
		}
	}
	st, err := p.compile(cfg, nil)
	if err != nil {
		return nil, err
	}
	p.state.Store(st)
	for _, in := range cfg.Inbound {
		l, err := p.newInbound(in)
		if err != nil {
			p.Close()
			return nil, err
		}
		p.inbound = append(p.inbound, l)
	}
	for _, out := range cfg.Outbound {
		l, err := p.newOutbound(out)
		if err != nil {
			p.Close()
			return nil, err
		}
		p.outbound = append(p.outbound, l)
	}
	return p, nil
}

// Update swaps in a new configuration: routes, clusters and endpoints take
// effect for the next request, and connection pools of unchanged clusters
// are kept. The set of listeners cannot change yet (that needs binding
// and draining listeners at runtime); such a configuration is refused and
// the running one kept.
func (p *Proxy) Update(cfg *Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("proxy update: %w", err)
	}
	old := p.state.Load()
	if !slices.Equal(cfg.Inbound, old.cfg.Inbound) || !slices.Equal(cfg.Outbound, old.cfg.Outbound) {
		return errors.New("proxy update: listeners changed; listener changes are not supported yet (restart the proxy)")
	}
	st, err := p.compile(cfg, old)
	if err != nil {
		return err
	}
	p.state.Store(st)
	for name, c := range old.clusters {
		if n, ok := st.clusters[name]; !ok || n.transport != c.transport {
			c.closeIdle()
		}
	}
	return nil
}

// Config returns the configuration in force.
func (p *Proxy) Config() *Config { return p.state.Load().cfg }

// Addr returns the bound address of the named listener, or "".
func (p *Proxy) Addr(name string) string {
	for _, l := range p.inbound {
		if l.cfg.Name == name {
			return l.ln.Addr().String()
		}
	}
	for _, l := range p.outbound {
		if l.cfg.Name == name {
			return l.ln.Addr().String()
		}
	}
	return ""
}

// Ready reports why the proxy cannot serve yet: it needs a configuration
// and an SVID valid now.
func (p *Proxy) Ready() error {
	if p.state.Load() == nil {
		return errors.New("no configuration")
	}
	svid, err := p.src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("no svid: %w", err)
	}
	now := p.clock.Now()
	if leaf := svid.Certificates[0]; now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
		return fmt.Errorf("svid %s not valid now (valid %s to %s)", svid.ID, leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))
	}
	return nil
}

// Run serves every listener until ctx ends, then drains: listeners stop
// accepting, in-flight requests and TCP connections get DrainTimeout to
// finish, and whatever remains is closed.
func (p *Proxy) Run(ctx context.Context) error {
	errc := make(chan error, len(p.inbound)+len(p.outbound))
	for _, l := range p.inbound {
		go func() { errc <- l.serve() }()
	}
	for _, l := range p.outbound {
		go func() { errc <- l.serve() }()
	}
	hctx, hcancel := context.WithCancel(ctx)
	hdone := make(chan struct{})
	go func() { p.healthCheck(hctx); close(hdone) }()
	defer func() { hcancel(); <-hdone }()
	if p.traces != nil {
		// Spans are sent on their own tick, ended (with a last flush)
		// after the drain so that drained requests' spans go too.
		tctx, tcancel := context.WithCancel(context.Background())
		ttick := p.clock.NewTicker(traceFlush)
		tdone := make(chan struct{})
		go func() { p.traces.run(tctx, ttick.Chan()); close(tdone) }()
		defer func() { ttick.Stop(); tcancel(); <-tdone }()
	}
	var err error
	tick := p.clock.NewTicker(accessLogFlush)
	defer tick.Stop()
	defer p.alog.flush()
wait:
	for {
		select {
		case <-tick.Chan():
			p.alog.flush()
		case <-ctx.Done():
			break wait
		case err = <-errc:
			err = fmt.Errorf("proxy listener: %w", err)
			break wait
		}
	}
	p.log.Info("proxy draining", "timeout", p.drain.String())
	dctx, cancel := context.WithTimeout(context.Background(), p.drain)
	defer cancel()
	var wg sync.WaitGroup
	for _, l := range p.inbound {
		wg.Go(func() { l.shutdown(dctx) })
	}
	for _, l := range p.outbound {
		wg.Go(func() { l.shutdown(dctx) })
	}
	wg.Wait()
	tcpDone := make(chan struct{})
	go func() { p.tcpWG.Wait(); close(tcpDone) }()
	select {
	case <-tcpDone:
	case <-dctx.Done():
		p.tcpMu.Lock()
		for c := range p.tcpConns {
			c.Close()
		}
		p.tcpMu.Unlock()
		<-tcpDone
	}
	for _, c := range p.state.Load().clusters {
		c.closeIdle()
	}
	p.log.Info("proxy stopped")
	return err
}

// Close releases the listeners of a Proxy that was never Run.
func (p *Proxy) Close() {
	for _, l := range p.inbound {
		l.ln.Close()
	}
	for _, l := range p.outbound {
		l.ln.Close()
	}
}

func (p *Proxy) trackTCP(cs ...net.Conn) func() {
	p.tcpMu.Lock()
	for _, c := range cs {
		p.tcpConns[c] = struct{}{}
	}
	p.tcpMu.Unlock()
	return func() {
		p.tcpMu.Lock()
		for _, c := range cs {
			delete(p.tcpConns, c)
		}
		p.tcpMu.Unlock()
	}
}

// selfID is the workload's current SPIFFE ID.
func (p *Proxy) selfID() spiffeid.ID {
	s, err := p.src.GetX509SVID()
	if err != nil {
		return spiffeid.ID{}
	}
	return s.ID
}

// handshakeTimeout bounds a TLS handshake on a mesh port.
const handshakeTimeout = 10 * time.Second

func tlsHandshake(ctx context.Context, c *tls.Conn) error {
	ctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	return c.HandshakeContext(ctx)
}
