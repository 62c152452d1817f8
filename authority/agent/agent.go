// Package agent is the node agent of writ-proxy: it attests the node to
// writd with a join token, keeps a node X.509 SVID, fetches the
// registration entries whose parent is this node, has writd sign an X.509
// SVID for each of them from keys generated here, renews everything at
// half life, and serves the SPIFFE Workload API on a unix socket to the
// local workloads whose peer credentials match an entry's selectors.
//
// Private keys are generated in this process and never leave it except to
// the workload entitled to them, over the local Workload API socket.
//
// It imports authority/nodeapi and authority/selector; cmd/writ-proxy and
// proxy import it.
package agent

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/authority/selector"
	"github.com/writmesh/writ/authority/svidtls"
)

// Defaults for Config's zero values.
const (
	DefaultSyncInterval = 30 * time.Second
	DefaultRPCTimeout   = 10 * time.Second
	// maxBackoff caps the retry delay while writd is unreachable.
	maxBackoff = 2 * time.Minute
	// signBatch bounds the CSRs sent in one SignX509SVIDs call.
	signBatch = 64
	// maxEntries bounds the entries the agent keeps for one node.
	maxEntries = 10000
	// DefaultMaxConns bounds open Workload API connections.
	DefaultMaxConns = 1024
	// DefaultJWTMintRate and DefaultJWTMintBurst bound how fast local
	// callers can make the agent ask writd for JWT-SVIDs (cache misses
	// only): a workload inventing audiences must not flood writd.
	DefaultJWTMintRate  = 20
	DefaultJWTMintBurst = 100
)

// Config configures an Agent.
type Config struct {
	// ControlPlane is writd's node API address, host:port.
	ControlPlane string
	// JoinToken is the one-time token that attests this node.
	JoinToken string
	// TrustDomain is the mesh's trust domain.
	TrustDomain spiffeid.TrustDomain
	// TrustBundle is the bootstrap bundle writd's certificate is verified
	// against until writd sends a newer one.
	TrustBundle *spiffebundle.Bundle
	// SyncInterval is how often entries and the bundle are fetched again.
	SyncInterval time.Duration
	// RPCTimeout bounds every call to writd.
	RPCTimeout time.Duration
	// AllowUnauthenticatedVerifiers lets callers that match no entry fetch
	// bundles and validate JWT-SVIDs. Off by default: a caller with no
	// identity learns nothing.
	AllowUnauthenticatedVerifiers bool
	// MaxConns bounds open Workload API connections; 0 means
	// DefaultMaxConns.
	MaxConns int
	// JWTMintRate (per second) and JWTMintBurst bound JWT-SVID minting
	// at writd on behalf of local callers; 0 means the defaults.
	JWTMintRate  float64
	JWTMintBurst int
	// Clock drives renewal, retries and expiry; nil means the real clock.
	Clock clockwork.Clock
	// Jitter returns a random duration in [0, max); nil means math/rand.
	Jitter func(max time.Duration) time.Duration
	// Log receives the agent's logs; nil discards them.
	Log *slog.Logger
	// DialOptions are added to the connection to writd (tests, tracing).
	DialOptions []grpc.DialOption
}

// Agent keeps this node's identities. Create it with New and start it with
// Run; serve its Workload API with Serve. Safe for concurrent use.
type Agent struct {
	cfg  Config
	log  *slog.Logger
	clk  clockwork.Clock
	cpID spiffeid.ID

	mu        sync.Mutex
	bundle    *spiffebundle.Bundle
	bundleSeq uint64
	node      *x509svid.SVID
	nodeAt    time.Time // renewal time of the node SVID
	nodeFails int
	synced    bool
	entries   map[string]*entry // by entry id
	changed   chan struct{}     // closed and replaced on every change
	conns     [2]*grpc.ClientConn
	stale     bool // a call found writd unreachable; dial afresh
	jwts      jwtCache
	mintLimit *rate.Limiter
}

// entry is a registration entry and its current X.509 SVID, if any.
type entry struct {
	id        string
	spiffeID  spiffeid.ID
	selectors []selector.Selector
	x509TTL   int32
	jwtTTL    int32

	svid    *x509svid.SVID
	keyDER  []byte // PKCS#8 of svid's key
	renewAt time.Time
	fails   int
	// lapsed is set when the SVID expired before it could be renewed.
	lapsed bool
}

// New validates cfg and returns an Agent that has not contacted writd yet.
func New(cfg Config) (*Agent, error) {
	if cfg.ControlPlane == "" {
		return nil, errors.New("agent: control plane address is required")
	}
	if cfg.JoinToken == "" {
		return nil, errors.New("agent: join token is required")
	}
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("agent: trust domain is required")
	}
	if cfg.TrustBundle == nil || len(cfg.TrustBundle.X509Authorities()) == 0 {
		return nil, errors.New("agent: a trust bundle with at least one X.509 authority is required")
	}
	if cfg.TrustBundle.TrustDomain() != cfg.TrustDomain {
		return nil, fmt.Errorf("agent: trust bundle is for %q, want %q", cfg.TrustBundle.TrustDomain(), cfg.TrustDomain)
	}
	if cfg.SyncInterval <= 0 {
		cfg.SyncInterval = DefaultSyncInterval
	}
	if cfg.RPCTimeout <= 0 {
		cfg.RPCTimeout = DefaultRPCTimeout
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.JWTMintRate <= 0 {
		cfg.JWTMintRate = DefaultJWTMintRate
	}
	if cfg.JWTMintBurst <= 0 {
		cfg.JWTMintBurst = DefaultJWTMintBurst
	}
	if cfg.Jitter == nil {
		cfg.Jitter = func(max time.Duration) time.Duration {
			if max <= 0 {
				return 0
			}
			return mrand.N(max)
		}
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cpID, err := spiffeid.FromSegments(cfg.TrustDomain, "writ", "control-plane")
	if err != nil {
		return nil, fmt.Errorf("agent: control plane id: %w", err)
	}
	return &Agent{
		cfg:     cfg,
		log:     log,
		clk:     cfg.Clock,
		cpID:    cpID,
		bundle:  cfg.TrustBundle.Clone(),
		entries: map[string]*entry{},
		changed: make(chan struct{}),
		jwts:    jwtCache{m: map[string]cachedJWT{}},
		// Guarded by mu, and fed the injected clock's time.
		mintLimit: rate.NewLimiter(rate.Limit(cfg.JWTMintRate), cfg.JWTMintBurst),
	}, nil
}

// Ready reports whether the agent holds an unexpired node SVID and has
// synced entries at least once, i.e. whether the Workload API can serve.
func (a *Agent) Ready() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.node != nil && a.synced && a.clk.Now().Before(a.node.Certificates[0].NotAfter)
}

// NodeID is the node's SPIFFE ID, zero before attestation.
func (a *Agent) NodeID() spiffeid.ID {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.node == nil {
		return spiffeid.ID{}
	}
	return a.node.ID
}

// Run attests the node and then keeps its SVIDs fresh until ctx ends. It
// returns nil on cancellation and an error only when attestation is refused
// (a bad or used join token cannot get better by retrying).
func (a *Agent) Run(ctx context.Context) error {
	defer a.closeConns()
	if err := a.attestLoop(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	nextSync := a.clk.Now()
	syncFails := 0
	for {
		a.reconnectIfStale()
		now := a.clk.Now()
		if !now.Before(nextSync) {
			if err := a.sync(ctx); err != nil {
				syncFails++
				d := a.backoff(syncFails)
				a.log.Warn("sync entries failed; serving cached SVIDs", logError, err, logRetryIn, d)
				nextSync = now.Add(d)
			} else {
				syncFails = 0
				nextSync = now.Add(a.cfg.SyncInterval)
			}
		}
		a.renewNodeIfDue(ctx, now)
		a.signDue(ctx, now)
		a.dropExpired(now)

		wake := a.nextWake(nextSync)
		d := wake.Sub(a.clk.Now())
		if d < 0 {
			d = 0
		}
		t := a.clk.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.Chan():
		}
	}
}

// backoff is the retry delay after n consecutive failures: doubling from
// one second, capped, with up to 20% jitter so that a fleet of agents
// does not retry in step.
func (a *Agent) backoff(n int) time.Duration {
	d := time.Second
	for i := 1; i < n && d < maxBackoff; i++ {
		d *= 2
	}
	d = min(d, maxBackoff)
	return d + a.cfg.Jitter(d/5)
}

// renewTime is when an SVID received at now and expiring at notAfter is
// renewed: at half its remaining life, minus up to a tenth of it as
// jitter. It counts from receipt, not NotBefore, because CAs backdate
// NotBefore for clock skew.
func (a *Agent) renewTime(now, notAfter time.Time) time.Time {
	life := notAfter.Sub(now)
	if life <= 0 {
		return now
	}
	return now.Add(life/2 - a.cfg.Jitter(life/10))
}

func (a *Agent) nextWake(nextSync time.Time) time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	wake := nextSync
	if a.node != nil && a.nodeAt.Before(wake) {
		wake = a.nodeAt
	}
	for _, e := range a.entries {
		if e.renewAt.Before(wake) {
			wake = e.renewAt
		}
		if e.svid != nil && e.svid.Certificates[0].NotAfter.Before(wake) {
			wake = e.svid.Certificates[0].NotAfter
		}
	}
	return wake
}

// notifyLocked wakes every Workload API stream. Callers hold a.mu.
func (a *Agent) notifyLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// --- connection to writd ---------------------------------------------------

// nodeSource hands the current node SVID to TLS handshakes.
type nodeSource struct{ a *Agent }

func (s nodeSource) GetX509SVID() (*x509svid.SVID, error) {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	if s.a.node == nil {
		return nil, errors.New("no node SVID yet")
	}
	return s.a.node, nil
}

// bundleSource hands the current trust bundle to TLS and SVID checks.
type bundleSource struct{ a *Agent }

func (s bundleSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b := s.a.currentBundle()
	if td != b.TrustDomain() {
		return nil, fmt.Errorf("no bundle for trust domain %q", td)
	}
	return b.X509Bundle(), nil
}

func (a *Agent) currentBundle() *spiffebundle.Bundle {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.bundle
}

func (a *Agent) dial(mtls bool) (*grpc.ClientConn, error) {
	// Certificates are checked on the agent's clock, like its renewals.
	var node x509svid.Source
	if mtls {
		node = nodeSource{a}
	}
	cfg := svidtls.ClientConfig(node, bundleSource{a}, svidtls.AuthorizeID(a.cpID), a.clk)
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg)), grpc.WithReadBufferSize(connReadBuffer)}, a.cfg.DialOptions...)
	cc, err := grpc.NewClient(a.cfg.ControlPlane, opts...)
	if err != nil {
		return nil, fmt.Errorf("dial control plane %s: %w", a.cfg.ControlPlane, err)
	}
	return cc, nil
}

// client returns the mTLS node API client.
func (a *Agent) client() (nodeapi.NodeClient, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.conns[0] == nil {
		return nil, errors.New("not attested")
	}
	return nodeapi.NewNodeClient(a.conns[0]), nil
}

// reconnect starts a new mTLS connection so that writd sees the renewed
// node SVID (a TLS session keeps the certificate of its handshake). The
// previous connection stays open for calls in flight and is closed at the
// next reconnect; at most two are open.
func (a *Agent) reconnect() error {
	cc, err := a.dial(true)
	if err != nil {
		return err
	}
	a.mu.Lock()
	old := a.conns[1]
	a.conns[1] = a.conns[0]
	a.conns[0] = cc
	a.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

// noteErr remembers that writd was unreachable, so that the next attempt
// dials a new connection instead of waiting out grpc's own reconnect
// backoff, which runs on the real clock and knows nothing of ours.
func (a *Agent) noteErr(err error) error {
	if status.Code(err) == codes.Unavailable {
		a.mu.Lock()
		a.stale = true
		a.mu.Unlock()
	}
	return err
}

func (a *Agent) reconnectIfStale() {
	a.mu.Lock()
	stale := a.stale
	a.stale = false
	a.mu.Unlock()
	if stale {
		if err := a.reconnect(); err != nil {
			a.log.Warn("reconnect to control plane", logError, err)
		}
	}
}

func (a *Agent) closeConns() {
	a.mu.Lock()
	conns := a.conns
	a.conns = [2]*grpc.ClientConn{}
	a.mu.Unlock()
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// --- node SVID -----------------------------------------------------------

// attestLoop attests the node, retrying while writd is unreachable.
func (a *Agent) attestLoop(ctx context.Context) error {
	for fails := 1; ; fails++ {
		err := a.attest(ctx)
		if err == nil {
			return nil
		}
		switch status.Code(err) {
		case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted:
		default:
			return fmt.Errorf("attest node: %w", err)
		}
		d := a.backoff(fails)
		a.log.Warn("attest node failed; retrying", logError, err, logRetryIn, d)
		t := a.clk.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.Chan():
		}
	}
}

func (a *Agent) attest(ctx context.Context) error {
	key, csr, err := newKeyAndCSR(spiffeid.ID{})
	if err != nil {
		return err
	}
	cc, err := a.dial(false)
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RPCTimeout)
	defer cancel()
	resp, err := nodeapi.NewNodeClient(cc).Attest(ctx, &nodeapi.AttestRequest{JoinToken: a.cfg.JoinToken, Csr: csr})
	if err != nil {
		return err
	}
	// The bundle came over a connection verified against the bootstrap
	// bundle; it becomes the one the node SVID is checked against.
	if resp.GetBundle() != nil {
		if _, err := a.applyBundle(resp.GetBundle()); err != nil {
			return status.Errorf(codes.Internal, "attest response: %v", err)
		}
	}
	svid, err := a.checkSVID(resp.GetSvid(), key)
	if err != nil {
		return status.Errorf(codes.Internal, "attest response: %v", err)
	}
	if err := checkNodeID(svid.ID, a.cfg.TrustDomain); err != nil {
		return status.Errorf(codes.Internal, "attest response: %v", err)
	}
	now := a.clk.Now()
	a.mu.Lock()
	a.node = svid
	a.nodeAt = a.renewTime(now, svid.Certificates[0].NotAfter)
	a.mu.Unlock()
	a.log.Info("node attested", logNodeID, svid.ID.String(), logExpiresAt, svid.Certificates[0].NotAfter)
	return a.reconnect()
}

func checkNodeID(id spiffeid.ID, td spiffeid.TrustDomain) error {
	if id.TrustDomain() != td || !strings.HasPrefix(id.Path(), "/node/") {
		return fmt.Errorf("node SVID has id %q, want %s/node/<name>", id, td.IDString())
	}
	return nil
}

func (a *Agent) renewNodeIfDue(ctx context.Context, now time.Time) {
	a.mu.Lock()
	due := a.node != nil && !now.Before(a.nodeAt)
	var id spiffeid.ID
	if a.node != nil {
		id = a.node.ID
	}
	a.mu.Unlock()
	if !due {
		return
	}
	err := a.renewNode(ctx, id)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		a.nodeFails++
		d := a.backoff(a.nodeFails)
		a.nodeAt = now.Add(d)
		a.log.Warn("renew node SVID failed", logError, err, logRetryIn, d)
		return
	}
	a.nodeFails = 0
}

func (a *Agent) renewNode(ctx context.Context, id spiffeid.ID) error {
	c, err := a.client()
	if err != nil {
		return err
	}
	key, csr, err := newKeyAndCSR(id)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RPCTimeout)
	defer cancel()
	resp, err := c.RenewNode(ctx, &nodeapi.RenewNodeRequest{Csr: csr})
	if err != nil {
		a.noteErr(err)
		return fmt.Errorf("renew node: %w", err)
	}
	svid, err := a.checkSVID(resp.GetSvid(), key)
	if err != nil {
		return fmt.Errorf("renew node: %w", err)
	}
	if svid.ID != id {
		return fmt.Errorf("renew node: got id %q, want %q", svid.ID, id)
	}
	now := a.clk.Now()
	a.mu.Lock()
	a.node = svid
	a.nodeAt = a.renewTime(now, svid.Certificates[0].NotAfter)
	a.mu.Unlock()
	a.log.Info("node SVID renewed", logNodeID, id.String(), logExpiresAt, svid.Certificates[0].NotAfter)
	return a.reconnect()
}

// checkSVID parses an SVID from writd and proves it is usable: the chain
// verifies against the current bundle and the leaf carries our key.
func (a *Agent) checkSVID(in *nodeapi.X509SVID, key crypto.Signer) (*x509svid.SVID, error) {
	if in == nil || len(in.GetCertChain()) == 0 {
		return nil, errors.New("no certificate in response")
	}
	certs := make([]*x509.Certificate, 0, len(in.GetCertChain()))
	for i, der := range in.GetCertChain() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", i, err)
		}
		certs = append(certs, c)
	}
	id, _, err := x509svid.Verify(certs, bundleSource{a}, x509svid.WithTime(a.clk.Now()))
	if err != nil {
		return nil, fmt.Errorf("verify SVID: %w", err)
	}
	pub, ok := certs[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("SVID does not certify the key we sent")
	}
	if in.GetSpiffeId() != "" && in.GetSpiffeId() != id.String() {
		return nil, fmt.Errorf("response says id %q but certificate says %q", in.GetSpiffeId(), id)
	}
	return &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}, nil
}

func newKeyAndCSR(id spiffeid.ID) (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	tmpl := &x509.CertificateRequest{}
	if !id.IsZero() {
		tmpl.URIs = []*url.URL{id.URL()}
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create csr: %w", err)
	}
	return key, csr, nil
}

// --- bundle and entries --------------------------------------------------

// applyBundle installs a bundle from writd unless it is older than ours. It
// reports whether anything changed.
func (a *Agent) applyBundle(in *nodeapi.Bundle) (bool, error) {
	if in.GetTrustDomain() != "" && in.GetTrustDomain() != a.cfg.TrustDomain.Name() {
		return false, fmt.Errorf("bundle is for trust domain %q, want %q", in.GetTrustDomain(), a.cfg.TrustDomain.Name())
	}
	b, err := spiffebundle.Parse(a.cfg.TrustDomain, in.GetSpiffeBundle())
	if err != nil {
		return false, fmt.Errorf("parse bundle: %w", err)
	}
	if len(b.X509Authorities()) == 0 {
		return false, errors.New("bundle has no X.509 authorities")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if in.GetSequence() < a.bundleSeq {
		a.log.Warn("ignoring older trust bundle", logSequence, in.GetSequence(), logHaveSequence, a.bundleSeq)
		return false, nil
	}
	if a.bundle.Equal(b) {
		a.bundleSeq = in.GetSequence()
		return false, nil
	}
	a.bundle = b
	a.bundleSeq = in.GetSequence()
	a.notifyLocked()
	a.log.Info("trust bundle updated", logSequence, in.GetSequence(), logX509Authorities, len(b.X509Authorities()), logJWTAuthorities, len(b.JWTAuthorities()))
	return true, nil
}

// sync fetches this node's entries and the bundle from writd.
func (a *Agent) sync(ctx context.Context) error {
	c, err := a.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RPCTimeout)
	defer cancel()
	resp, err := c.FetchEntries(ctx, &nodeapi.FetchEntriesRequest{})
	if err != nil {
		a.noteErr(err)
		return fmt.Errorf("fetch entries: %w", err)
	}
	if resp.GetBundle() != nil {
		if _, err := a.applyBundle(resp.GetBundle()); err != nil {
			a.log.Warn("bad bundle from control plane", logError, err)
		}
	}
	if len(resp.GetEntries()) > maxEntries {
		return fmt.Errorf("fetch entries: %d entries exceed the limit of %d", len(resp.GetEntries()), maxEntries)
	}
	nodeID := a.NodeID()
	fresh := map[string]*entry{}
	for _, in := range resp.GetEntries() {
		e, err := parseEntry(in, a.cfg.TrustDomain, nodeID)
		if err != nil {
			a.log.Warn("skipping entry", logEntryID, in.GetId(), logError, err)
			continue
		}
		fresh[e.id] = e
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	changed := !a.synced
	for id, old := range a.entries {
		if _, ok := fresh[id]; !ok {
			delete(a.entries, id)
			a.jwts.dropEntry(id)
			changed = true
			a.log.Info("entry removed", logEntryID, id, logSPIFFEID, old.spiffeID.String())
		}
	}
	for id, e := range fresh {
		old, ok := a.entries[id]
		switch {
		case !ok:
			a.entries[id] = e
			changed = true
			a.log.Info("entry added", logEntryID, id, logSPIFFEID, e.spiffeID.String())
		case old.spiffeID != e.spiffeID || old.x509TTL != e.x509TTL:
			// The identity itself changed: the old SVID must not be served.
			a.entries[id] = e
			a.jwts.dropEntry(id)
			changed = true
		case !slices.Equal(old.selectors, e.selectors) || old.jwtTTL != e.jwtTTL:
			old.selectors = e.selectors
			old.jwtTTL = e.jwtTTL
			a.jwts.dropEntry(id)
			changed = true
		}
	}
	a.synced = true
	if changed {
		a.notifyLocked()
	}
	return nil
}

func parseEntry(in *nodeapi.Entry, td spiffeid.TrustDomain, node spiffeid.ID) (*entry, error) {
	if in.GetId() == "" || len(in.GetId()) > 256 {
		return nil, errors.New("entry id must be 1 to 256 bytes")
	}
	id, err := spiffeid.FromString(in.GetSpiffeId())
	if err != nil {
		return nil, fmt.Errorf("spiffe id: %w", err)
	}
	if id.TrustDomain() != td {
		return nil, fmt.Errorf("spiffe id %q is outside trust domain %q", id, td)
	}
	if in.GetParentId() != "" && in.GetParentId() != node.String() {
		return nil, fmt.Errorf("entry's parent is %q, not this node", in.GetParentId())
	}
	sels, err := selector.ParseAll(in.GetSelectors())
	if err != nil {
		return nil, fmt.Errorf("selectors: %w", err)
	}
	return &entry{id: in.GetId(), spiffeID: id, selectors: sels, x509TTL: in.GetX509TtlSeconds(), jwtTTL: in.GetJwtTtlSeconds()}, nil
}

// --- workload SVIDs --------------------------------------------------------

type pendingCSR struct {
	entryID string
	id      spiffeid.ID
	key     crypto.Signer
	csr     []byte
}

// signDue has writd sign a fresh SVID for every entry whose SVID is missing
// or due for renewal, in batches, with a new key each.
func (a *Agent) signDue(ctx context.Context, now time.Time) {
	a.mu.Lock()
	var due []pendingCSR
	for _, e := range a.entries {
		if !now.Before(e.renewAt) {
			due = append(due, pendingCSR{entryID: e.id, id: e.spiffeID})
		}
	}
	a.mu.Unlock()
	if len(due) == 0 {
		return
	}
	for i := range due {
		key, csr, err := newKeyAndCSR(due[i].id)
		if err != nil {
			a.log.Error("make workload key", logError, err)
			return
		}
		due[i].key, due[i].csr = key, csr
	}
	for start := 0; start < len(due); start += signBatch {
		batch := due[start:min(start+signBatch, len(due))]
		results, err := a.signBatch(ctx, batch)
		a.storeSigned(now, batch, results, err)
	}
}

func (a *Agent) signBatch(ctx context.Context, batch []pendingCSR) (map[string]*nodeapi.SignResult, error) {
	c, err := a.client()
	if err != nil {
		return nil, err
	}
	req := &nodeapi.SignX509SVIDsRequest{}
	for _, p := range batch {
		req.Csrs = append(req.Csrs, &nodeapi.CSR{EntryId: p.entryID, Csr: p.csr})
	}
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RPCTimeout)
	defer cancel()
	resp, err := c.SignX509SVIDs(ctx, req)
	if err != nil {
		a.noteErr(err)
		return nil, fmt.Errorf("sign workload SVIDs: %w", err)
	}
	out := make(map[string]*nodeapi.SignResult, len(resp.GetResults()))
	for _, r := range resp.GetResults() {
		out[r.GetEntryId()] = r
	}
	return out, nil
}

func (a *Agent) storeSigned(now time.Time, batch []pendingCSR, results map[string]*nodeapi.SignResult, callErr error) {
	type good struct {
		p    pendingCSR
		svid *x509svid.SVID
		der  []byte
	}
	var oks []good
	failed := map[string]error{}
	for _, p := range batch {
		if callErr != nil {
			failed[p.entryID] = callErr
			continue
		}
		r := results[p.entryID]
		switch {
		case r == nil:
			failed[p.entryID] = errors.New("no result for entry")
			continue
		case r.GetError() != "":
			failed[p.entryID] = fmt.Errorf("refused: %s", r.GetError())
			continue
		}
		svid, err := a.checkSVID(r.GetSvid(), p.key)
		if err == nil && svid.ID != p.id {
			err = fmt.Errorf("got id %q, want %q", svid.ID, p.id)
		}
		if err != nil {
			failed[p.entryID] = err
			continue
		}
		der, err := x509.MarshalPKCS8PrivateKey(p.key)
		if err != nil {
			failed[p.entryID] = err
			continue
		}
		oks = append(oks, good{p, svid, der})
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	changed := false
	for _, g := range oks {
		e, ok := a.entries[g.p.entryID]
		if !ok || e.spiffeID != g.p.id {
			continue // removed or changed while we were signing
		}
		e.svid, e.keyDER, e.fails, e.lapsed = g.svid, g.der, 0, false
		e.renewAt = a.renewTime(a.clk.Now(), g.svid.Certificates[0].NotAfter)
		changed = true
		a.log.Info("workload SVID issued", logEntryID, e.id, logSPIFFEID, e.spiffeID.String(), logExpiresAt, g.svid.Certificates[0].NotAfter)
	}
	for id, err := range failed {
		e, ok := a.entries[id]
		if !ok {
			continue
		}
		e.fails++
		d := a.backoff(e.fails)
		e.renewAt = now.Add(d)
		a.log.Warn("workload SVID not issued; keeping the cached one while valid", logEntryID, id, logSPIFFEID, e.spiffeID.String(), logError, err, logRetryIn, d)
	}
	if changed {
		a.notifyLocked()
	}
}

// dropExpired forgets SVIDs past their NotAfter: an expired SVID is never
// served, whatever the state of writd.
func (a *Agent) dropExpired(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	changed := false
	for _, e := range a.entries {
		if e.svid != nil && !now.Before(e.svid.Certificates[0].NotAfter) {
			a.log.Warn("workload SVID expired before it could be renewed", logEntryID, e.id, logSPIFFEID, e.spiffeID.String())
			e.svid, e.keyDER, e.lapsed = nil, nil, true
			changed = true
		}
	}
	if a.node != nil && !now.Before(a.node.Certificates[0].NotAfter) {
		a.log.Error("node SVID expired; the node must be attested again with a new join token")
	}
	if changed {
		a.notifyLocked()
	}
}
