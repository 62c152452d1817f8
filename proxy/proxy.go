// Package proxy is Writ's sidecar data plane: inbound mTLS termination with
// SPIFFE peer checks and an in-process authorization decision for every
// request, outbound routing, load balancing and retries over mTLS HTTP/2
// to peer sidecars, metrics, access logs and an admin port.
//
// Its configuration is a Config, shaped like the Envoy resources writd
// serves over xDS: proxy/xdsclient translates them (ListenersFromEnvoy,
// RoutesFromEnvoy, ClustersFromEnvoy) and pushes each new one with
// Proxy.Update; a static YAML Config serves tests without writd.
//
// It imports enforcer and authority/svidtls; only cmd/writ-proxy and tests
// import it.
package proxy

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
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
	// EnforcerFor, if set, gives the enforcer of a policy decision
	// (data.PACKAGE.RULE) other than Enforcer's, for inbound listeners
	// whose AuthorizationPolicy binds one (Inbound.AuthzDecision), or of
	// several joined by "," when several policies are enforced on the
	// service, every one of which must allow (enforcer.Binder); with
	// dryRun (Inbound.AuthzDryRun) not empty, that enforcer evaluates
	// those decisions too and records them, never enforced. It is
	// called when such a listener is bound, never per request. Without
	// it, such listeners are refused. It should return one enforcer per
	// decision (a cache): Update asks before binding and again to bind.
	EnforcerFor func(decision, dryRun string) (*enforcer.Enforcer, error)
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
	// OTLPProtocol is OTLPProtocolHTTP (empty) or OTLPProtocolGRPC, for
	// which OTLPTracesURL is the collector's http:// (plaintext) or
	// https:// address, e.g. http://collector:4317.
	OTLPProtocol string
	// OTLP is how the exporter reaches the collector: headers, TLS,
	// timeout, compression.
	OTLP OTLPExport
	// TraceSampler decides which new traces are exported; nil is all.
	TraceSampler *TraceSampler
	// ServiceName is the spans' service.name; empty is "writ-proxy".
	ServiceName string
	// MaxHeldBodyBytesTotal bounds the bytes of request bodies held for
	// their policy check (RequestBody) by all requests together; a
	// request that would take the total over it is answered 503. Zero is
	// DefaultMaxHeldBodyBytesTotal; negative is an error.
	MaxHeldBodyBytesTotal int64
	// WatchClientAfter is how long an HTTP/1.1 request waits for its
	// answer before the proxy watches its client's connection, to cancel
	// the request upstream if the client goes away; zero is 500 ms.
	// Requests answered sooner cost nothing for it.
	WatchClientAfter time.Duration
}

// Proxy is a running data plane. It is safe for concurrent use.
type Proxy struct {
	src Source
	td  spiffeid.TrustDomain
	enf *enforcer.Enforcer
	// enforcerFor gives the enforcers of other decisions (Options).
	enforcerFor func(decision, dryRun string) (*enforcer.Enforcer, error)
	reg         *prometheus.Registry
	metrics     *metrics
	alog        *accessLog
	traces      *traceExporter
	sampler     *TraceSampler
	drain       time.Duration
	watchAfter  time.Duration
	clock       clockwork.Clock
	log         *slog.Logger
	state       atomic.Pointer[state]
	// selfCache holds the parts of the last SPIFFE ID seen (see self).
	selfCache atomic.Pointer[self]
	// lmu guards the listener sets, which Update may change while Run
	// serves them, and the fields below it.
	lmu      sync.Mutex
	inbound  []*inboundListener
	outbound []*outboundListener
	serving  bool // Run has started the listeners and not begun to drain
	stopped  bool
	errc     chan error     // listener failures, for Run
	retiring sync.WaitGroup // listeners removed by Update, draining
	// tcpConns tracks spliced connections so that drain can end them.
	tcpMu    sync.Mutex
	tcpConns map[net.Conn]struct{}
	tcpWG    sync.WaitGroup
	// bodies bounds the bytes held for checks across every inbound
	// listener, those Update adds included.
	bodies *bodyBudget
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
	if opts.MaxHeldBodyBytesTotal < 0 {
		return nil, errors.New("proxy: negative MaxHeldBodyBytesTotal")
	}
	if opts.WatchClientAfter <= 0 {
		opts.WatchClientAfter = DefaultWatchClientAfter
	}
	if opts.MaxHeldBodyBytesTotal == 0 {
		opts.MaxHeldBodyBytesTotal = DefaultMaxHeldBodyBytesTotal
	}
	m, err := newMetrics(opts.Registry)
	if err != nil {
		return nil, err
	}
	p := &Proxy{
		src: opts.Source, td: svid.ID.TrustDomain(), enf: opts.Enforcer, enforcerFor: opts.EnforcerFor, reg: opts.Registry, metrics: m,
		alog: newAccessLog(opts.AccessLog), drain: opts.DrainTimeout, watchAfter: opts.WatchClientAfter, clock: opts.Clock, log: opts.Log,
		tcpConns: map[net.Conn]struct{}{}, errc: make(chan error, 1),
		sampler: opts.TraceSampler,
		bodies:  &bodyBudget{max: opts.MaxHeldBodyBytesTotal, bytes: m.heldBytes, overflows: m.heldOverflows},
	}
	// A proxy that fails to start leaves the registry as it found it: the
	// xDS client tries again with the next configuration.
	fail := func(err error) (*Proxy, error) {
		p.Close()
		m.unregister(opts.Registry)
		return nil, err
	}
	if opts.OTLPTracesURL != "" {
		var u string
		var err error
		switch opts.OTLPProtocol {
		case "", OTLPProtocolHTTP:
			u, err = OTLPTracesURL("", opts.OTLPTracesURL)
		case OTLPProtocolGRPC:
			u, err = OTLPGRPCTarget("", opts.OTLPTracesURL)
		default:
			err = fmt.Errorf("otlp protocol %q: want %s or %s", opts.OTLPProtocol, OTLPProtocolHTTP, OTLPProtocolGRPC)
		}
		if err != nil {
			return fail(fmt.Errorf("proxy: %w", err))
		}
		if opts.ServiceName == "" {
			opts.ServiceName = "writ-proxy"
		}
		if p.traces, err = newTraceExporter(u, opts.OTLPProtocol, opts.ServiceName, opts.OTLP, opts.Clock, opts.Registry, opts.Log); err != nil {
			return fail(err)
		}
	}
	st, err := p.compile(cfg, nil)
	if err != nil {
		return fail(err)
	}
	p.state.Store(st)
	for _, in := range cfg.Inbound {
		l, err := p.newInbound(in)
		if err != nil {
			return fail(err)
		}
		p.inbound = append(p.inbound, l)
	}
	for _, out := range cfg.Outbound {
		l, err := p.newOutbound(out)
		if err != nil {
			return fail(err)
		}
		p.outbound = append(p.outbound, l)
	}
	return p, nil
}

// inboundEnforcer is the enforcer deciding an inbound listener: the
// proxy's, unless the listener's AuthorizationPolicy binds another
// decision, whose enforcer comes from EnforcerFor. A binding that cannot
// be honoured is an error, so that the configuration is refused rather
// than decided by a rule the operator did not bind. Without any enforcer
// every request is denied anyway.
func (p *Proxy) inboundEnforcer(in Inbound) (*enforcer.Enforcer, error) {
	if p.enf == nil {
		return nil, nil
	}
	decision := cmp.Or(in.AuthzDecision, p.enf.DecisionPath())
	if decision == p.enf.DecisionPath() && in.AuthzDryRun == "" {
		return p.enf, nil
	}
	if p.enforcerFor == nil {
		return nil, fmt.Errorf("inbound %q: its AuthorizationPolicies decide by %s (dry run: %q), this proxy's policy by %s only", in.Name, decision, in.AuthzDryRun, p.enf.DecisionPath())
	}
	enf, err := p.enforcerFor(decision, in.AuthzDryRun)
	if err != nil {
		return nil, fmt.Errorf("inbound %q: policy decision %s: %w", in.Name, decision, err)
	}
	return enf, nil
}

// Rebind resolves every inbound listener's policy binding again, after
// the policies changed: a listener bound while a dry-run rule was missing
// holds an enforcer recording that error, and the binding is otherwise
// only resolved when a configuration change rebinds the listener. A
// listener whose binding now fails keeps its enforcer; the errors are
// joined.
func (p *Proxy) Rebind() error {
	p.lmu.Lock()
	defer p.lmu.Unlock()
	var errs []error
	for _, l := range p.inbound {
		enf, err := p.inboundEnforcer(l.cfg)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		l.enf.Store(enf)
	}
	return errors.Join(errs...)
}

// Update swaps in a new configuration: routes, clusters and endpoints take
// effect for the next request, and connection pools of unchanged clusters
// are kept. Listeners are compared by name: new ones are bound (all or
// none: if one cannot be bound, nothing changes), removed or changed
// ones stop accepting and drain in the background, unchanged ones keep
// serving untouched. An invalid configuration is refused and the running
// one kept.
func (p *Proxy) Update(cfg *Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("proxy update: %w", err)
	}
	// Policy bindings are resolved before anything changes: a listener
	// that cannot be decided as bound refuses the whole update.
	for _, in := range cfg.Inbound {
		if _, err := p.inboundEnforcer(in); err != nil {
			return fmt.Errorf("proxy update: %w", err)
		}
	}
	p.lmu.Lock()
	defer p.lmu.Unlock()
	if p.stopped {
		return errors.New("proxy update: the proxy has stopped")
	}
	old := p.state.Load()
	st, err := p.compile(cfg, old)
	if err != nil {
		return err
	}
	oldIn := map[string]*inboundListener{}
	for _, l := range p.inbound {
		oldIn[l.cfg.Name] = l
	}
	oldOut := map[string]*outboundListener{}
	for _, l := range p.outbound {
		oldOut[l.cfg.Name] = l
	}
	// Listeners that go away (or change) free their addresses; new ones
	// on other addresses are bound first, so that a failure changes
	// nothing.
	freed := map[string]bool{}
	keepIn, keepOut := map[string]bool{}, map[string]bool{}
	for _, in := range cfg.Inbound {
		if l := oldIn[in.Name]; l != nil && l.cfg == in {
			keepIn[in.Name] = true
		}
	}
	for _, out := range cfg.Outbound {
		if l := oldOut[out.Name]; l != nil && l.cfg == out {
			keepOut[out.Name] = true
		}
	}
	var retire []func(context.Context)
	var retireLn []net.Listener
	for name, l := range oldIn {
		if !keepIn[name] {
			freed[l.cfg.Address] = true
			retire, retireLn = append(retire, l.shutdown), append(retireLn, l.ln)
		}
	}
	for name, l := range oldOut {
		if !keepOut[name] {
			freed[l.cfg.Address] = true
			retire, retireLn = append(retire, l.shutdown), append(retireLn, l.ln)
		}
	}
	var newIn []*inboundListener
	var newOut []*outboundListener
	var fresh []interface{ close() }
	bind := func(late bool) error {
		for _, in := range cfg.Inbound {
			if keepIn[in.Name] || freed[in.Address] != late {
				continue
			}
			l, err := p.newInbound(in)
			if err != nil {
				return err
			}
			newIn, fresh = append(newIn, l), append(fresh, closer{l.ln})
		}
		for _, out := range cfg.Outbound {
			if keepOut[out.Name] || freed[out.Address] != late {
				continue
			}
			l, err := p.newOutbound(out)
			if err != nil {
				return err
			}
			newOut, fresh = append(newOut, l), append(fresh, closer{l.ln})
		}
		return nil
	}
	if err := bind(false); err != nil {
		for _, f := range fresh {
			f.close()
		}
		return fmt.Errorf("proxy update: %w", err)
	}
	// Past this point the update goes ahead: the retiring listeners stop
	// accepting so that their addresses can be bound again.
	for _, ln := range retireLn {
		ln.Close()
	}
	lateErr := bind(true)
	for _, n := range newIn {
		if l := oldIn[n.cfg.Name]; l != nil && l.cfg.Service == n.cfg.Service {
			l.next.Store(n)
		}
	}
	p.state.Store(st)
	var in []*inboundListener
	for _, l := range p.inbound {
		if keepIn[l.cfg.Name] {
			in = append(in, l)
		}
	}
	var out []*outboundListener
	for _, l := range p.outbound {
		if keepOut[l.cfg.Name] {
			out = append(out, l)
		}
	}
	p.inbound, p.outbound = append(in, newIn...), append(out, newOut...)
	if p.serving {
		for _, l := range newIn {
			go p.report(l.serve)
		}
		for _, l := range newOut {
			go p.report(l.serve)
		}
	}
	for _, r := range retire {
		p.retiring.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), p.drain)
			defer cancel()
			r(ctx)
		})
	}
	for name, c := range old.clusters {
		if n, ok := st.clusters[name]; !ok || n.transport != c.transport {
			c.closeIdle()
		}
	}
	if lateErr != nil {
		return fmt.Errorf("proxy update: applied, but a changed listener could not be bound again: %w", lateErr)
	}
	return nil
}

type closer struct{ ln net.Listener }

func (c closer) close() { c.ln.Close() }

// report runs a listener and hands its failure to Run. A listener closed
// by Update or drain is not a failure.
func (p *Proxy) report(serve func() error) {
	if err := serve(); err != nil && !errors.Is(err, net.ErrClosed) {
		select {
		case p.errc <- err:
		default:
		}
	}
}

// acceptLoop hands each connection ln accepts to handle, on a goroutine
// that drain waits for through tcpWG, until ln is closed (nil). A
// timeout does not end the listener: it is retried after a pause, so
// that a persistent one does not spin. Any other error does, named after
// the listener (kind is inbound or outbound).
func (p *Proxy) acceptLoop(ln net.Listener, kind, name string, handle func(net.Conn)) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			return fmt.Errorf("%s %s: accept: %w", kind, name, err)
		}
		p.tcpWG.Add(1)
		go func() {
			defer p.tcpWG.Done()
			handle(c)
		}()
	}
}

// Config returns the configuration in force.
func (p *Proxy) Config() *Config { return p.state.Load().cfg }

// Addr returns the bound address of the named listener, or "".
func (p *Proxy) Addr(name string) string {
	p.lmu.Lock()
	defer p.lmu.Unlock()
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
	p.lmu.Lock()
	p.serving = true
	for _, l := range p.inbound {
		go p.report(l.serve)
	}
	for _, l := range p.outbound {
		go p.report(l.serve)
	}
	p.lmu.Unlock()
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
		case err = <-p.errc:
			err = fmt.Errorf("proxy listener: %w", err)
			break wait
		}
	}
	p.log.Info("proxy draining", "timeout", p.drain.String())
	dctx, cancel := context.WithTimeout(context.Background(), p.drain)
	defer cancel()
	p.lmu.Lock()
	p.serving, p.stopped = false, true
	inbound, outbound := p.inbound, p.outbound
	p.lmu.Unlock()
	var wg sync.WaitGroup
	for _, l := range inbound {
		wg.Go(func() { l.shutdown(dctx) })
	}
	for _, l := range outbound {
		wg.Go(func() { l.shutdown(dctx) })
	}
	wg.Wait()
	p.retiring.Wait()
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
	p.lmu.Lock()
	defer p.lmu.Unlock()
	p.stopped = true
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

// self is the workload's SPIFFE ID with its parts, computed once per ID.
type self struct {
	id     spiffeid.ID
	s      string
	ns, wl string
}

// self describes the workload's current SPIFFE ID; the SVID may rotate
// (even to another ID), so it is compared each time, not cached for good.
func (p *Proxy) self() *self {
	id := p.selfID()
	if c := p.selfCache.Load(); c != nil && c.id == id {
		return c
	}
	ns, wl := workloadParts(id)
	c := &self{id: id, s: id.String(), ns: ns, wl: wl}
	p.selfCache.Store(c)
	return c
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
