package authority

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/config"
)

// caLockKey is the transaction advisory lock that serializes changes to the
// CA's shared state (roots, their rotation) across writd replicas. It is
// "writca-1" in ASCII, recognisable in pg_locks.
const caLockKey int64 = 0x7772697463612d31

// backdate moves NotBefore into the past so that a verifier whose clock is
// a little behind ours accepts a certificate at once.
const backdate = 10 * time.Second

// Log field names.
const (
	logRoot         = "root_id"
	logIntermediate = "intermediate_serial"
	logKeyID        = "kid"
	logReplica      = "replica_id"
)

// Options configures NewCA.
type Options struct {
	TrustDomain spiffeid.TrustDomain
	Pool        *pgxpool.Pool
	// Config is writd's CA section; zero durations take the config.Default*
	// values.
	Config config.CA
	// ReplicaID names this writd replica in ca_intermediates and jwt_keys.
	ReplicaID string
	// KEK seals the root key at rest (32 bytes, see LoadKEK). Required
	// unless Upstream is set.
	KEK []byte
	// RootCertPEM and RootKeyPEM import an existing root on first start
	// (when the database has no active root); later starts ignore them.
	RootCertPEM, RootKeyPEM []byte
	// Upstream, when set, signs this replica's intermediates, and its roots
	// are the bundle's X.509 authorities.
	Upstream UpstreamSigner
	// OnIssuance, when set, is called in the transaction that logs each
	// intermediate the CA creates (writd records it as an audit event).
	OnIssuance IssuanceHook
	Clock      clockwork.Clock
	Log        *slog.Logger
}

// settings are the CA's durations with defaults applied.
type settings struct {
	rootTTL, interTTL         time.Duration
	x509TTL, x509Max          time.Duration
	jwtTTL, jwtMax, jwtKeyTTL time.Duration
	hint                      time.Duration
}

func resolve(c config.CA) settings {
	d := func(v config.Duration, def time.Duration) time.Duration {
		if v <= 0 {
			return def
		}
		return v.D()
	}
	return settings{
		rootTTL:   d(c.RootTTL, config.DefaultRootTTL),
		interTTL:  d(c.IntermediateTTL, config.DefaultIntermediateTTL),
		x509TTL:   d(c.X509SVIDTTL, config.DefaultX509SVIDTTL),
		x509Max:   d(c.X509SVIDMaxTTL, config.DefaultX509SVIDMaxTTL),
		jwtTTL:    d(c.JWTSVIDTTL, config.DefaultJWTSVIDTTL),
		jwtMax:    d(c.JWTSVIDMaxTTL, config.DefaultJWTSVIDMaxTTL),
		jwtKeyTTL: d(c.JWTKeyTTL, config.DefaultJWTKeyTTL),
		hint:      d(c.BundleRefreshHint, config.DefaultBundleRefreshHint),
	}
}

// publishDelay is how long a new root or JWT key sits in the bundle before
// it signs anything: every replica refreshes its cached bundle within one
// poll interval (at most one refresh hint) and every verifier refetches the
// bundle within one refresh hint, so after two hints everyone has it.
func (s settings) publishDelay() time.Duration { return 2 * s.hint }

// pollInterval is how often Run looks at the shared state.
func (s settings) pollInterval() time.Duration {
	return min(max(s.hint/2, time.Second), 30*time.Second)
}

// CA is Writ's certificate authority: one per writd replica, all replicas
// sharing a root (or an upstream CA) through PostgreSQL. Each replica has
// its own signing intermediate and JWT key, whose private halves exist only
// in its memory. CA implements Signer and is safe for concurrent use; Run
// must be running for rotation and for the bundle to follow other replicas.
type CA struct {
	td       spiffeid.TrustDomain
	pool     *pgxpool.Pool
	set      settings
	replica  string
	kek      []byte
	upstream UpstreamSigner
	clock    clockwork.Clock
	log      *slog.Logger
	onIssu   IssuanceHook

	// mu guards inter, jwtCur, jwtNext and stopped. Signers hold it for
	// reading while they sign, so that once rotation has swapped an
	// intermediate out under the write lock, nothing more is signed with
	// it and its latest leaf expiry is final.
	mu      sync.RWMutex
	inter   *intermediate
	jwtCur  *jwtKey
	jwtNext *jwtKey
	stopped bool

	// tickMu serializes the rotation work of Run and of direct callers.
	tickMu sync.Mutex
	// roots caches unsealed root keys by root id; guarded by rootsMu.
	rootsMu sync.Mutex
	roots   map[string]*rootCA

	// bundleMu serializes refreshBundle, so that a slower refresh never
	// replaces a newer bundle with an older one.
	bundleMu sync.Mutex
	bundle   atomic.Pointer[spiffebundle.Bundle]
}

var _ Signer = (*CA)(nil)

type rootCA struct {
	id   string
	cert *x509.Certificate
	key  crypto.Signer
}

// intermediate is a replica's signing CA.
type intermediate struct {
	cert *x509.Certificate
	// chain is cert then any upstream intermediates, as leaves carry it.
	chain  []*x509.Certificate
	key    *ecdsa.PrivateKey
	rootID string // empty in upstream mode
	serial string
	// notAfter is the earliest expiry along chain: no leaf may outlive it.
	notAfter time.Time
	// maxLeaf is the latest leaf NotAfter signed, in Unix nanoseconds.
	maxLeaf atomic.Int64
}

// NewCA starts this replica's CA: it loads the shared root (creating or
// importing it on the very first start), creates this replica's
// intermediate and JWT signing key, and publishes the bundle. Replicas may
// start concurrently: root creation is serialized by an advisory lock.
func NewCA(ctx context.Context, o Options) (*CA, error) {
	if o.TrustDomain.IsZero() {
		return nil, errors.New("new ca: trust domain is required")
	}
	if o.Pool == nil {
		return nil, errors.New("new ca: database pool is required")
	}
	if o.ReplicaID == "" {
		return nil, errors.New("new ca: replica id is required")
	}
	if o.Upstream == nil && len(o.KEK) != kekSize {
		return nil, fmt.Errorf("new ca: a %d-byte key-encryption key (KEK) is required to seal the root key (got %d bytes)", kekSize, len(o.KEK))
	}
	if o.Clock == nil {
		o.Clock = clockwork.NewRealClock()
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	set := resolve(o.Config)
	if set.x509TTL > set.x509Max {
		return nil, fmt.Errorf("new ca: x509 svid ttl %s exceeds its maximum %s", set.x509TTL, set.x509Max)
	}
	if set.jwtTTL > set.jwtMax {
		return nil, fmt.Errorf("new ca: jwt svid ttl %s exceeds its maximum %s", set.jwtTTL, set.jwtMax)
	}
	if need := 2 * (set.publishDelay() + set.jwtMax); set.jwtKeyTTL <= need {
		return nil, fmt.Errorf("new ca: jwt key ttl %s must exceed %s (twice the publish delay of two bundle refresh hints plus the jwt svid max ttl), or keys could not overlap", set.jwtKeyTTL, need)
	}
	c := &CA{
		td:       o.TrustDomain,
		pool:     o.Pool,
		set:      set,
		replica:  o.ReplicaID,
		kek:      o.KEK,
		upstream: o.Upstream,
		clock:    o.Clock,
		log:      o.Log.With(logReplica, o.ReplicaID),
		onIssu:   o.OnIssuance,
		roots:    map[string]*rootCA{},
	}
	var imported *rootCA
	if len(o.RootCertPEM) > 0 || len(o.RootKeyPEM) > 0 {
		if o.Upstream != nil {
			return nil, errors.New("new ca: a root to import and an upstream CA are both configured; use one")
		}
		r, err := parseRootPEM(o.RootCertPEM, o.RootKeyPEM, c.clock.Now())
		if err != nil {
			return nil, fmt.Errorf("new ca: import root: %w", err)
		}
		imported = r
	}
	if _, err := c.pool.Exec(ctx, `INSERT INTO bundle_state (id, sequence, digest, updated_at) VALUES (true, 0, '\x', $1) ON CONFLICT (id) DO NOTHING`, c.clock.Now()); err != nil {
		return nil, fmt.Errorf("new ca: init bundle state: %w", err)
	}
	if c.upstream == nil {
		if err := c.bootstrapRoot(ctx, imported); err != nil {
			return nil, fmt.Errorf("new ca: %w", err)
		}
	}
	inter, err := c.newIntermediate(ctx)
	if err != nil {
		return nil, fmt.Errorf("new ca: %w", err)
	}
	c.inter = inter
	k, err := c.newJWTKey(ctx, true)
	if err != nil {
		return nil, fmt.Errorf("new ca: %w", err)
	}
	c.jwtCur = k
	if k.activeAt.After(c.clock.Now()) {
		adopted, err := c.adoptJWTKey(ctx)
		if err != nil {
			return nil, fmt.Errorf("new ca: %w", err)
		}
		if adopted != nil {
			c.jwtCur, c.jwtNext = adopted, k
		}
	}
	if err := c.refreshBundle(ctx); err != nil {
		return nil, fmt.Errorf("new ca: %w", err)
	}
	return c, nil
}

// TrustDomain is the trust domain this CA issues for.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// ControlPlaneID is the SPIFFE ID writd itself uses.
func (c *CA) ControlPlaneID() spiffeid.ID {
	return spiffeid.RequireFromPath(c.td, "/writ/control-plane")
}

// Roots returns the bundle's current X.509 authorities, for TLS
// configurations that need a root pool.
func (c *CA) Roots() []*x509.Certificate {
	return c.bundle.Load().X509Authorities()
}

// Bundle returns a copy of the current trust bundle, as last refreshed
// from the database.
func (c *CA) Bundle(ctx context.Context) (*spiffebundle.Bundle, error) {
	b := c.bundle.Load()
	if b == nil {
		return nil, errors.New("bundle: not loaded")
	}
	return b.Clone(), nil
}

// Run rotates this replica's intermediate and JWT key, advances root
// rotations, follows changes other replicas make, and refreshes the
// bundle, polling on the CA's clock until ctx ends. Errors of one pass are
// logged and retried on the next. When Run returns, the CA stops signing
// and records its intermediate as retired, so that a root rotation need not
// wait for this replica's intermediate to expire. Call it once.
func (c *CA) Run(ctx context.Context) error {
	t := c.clock.NewTicker(c.set.pollInterval())
	defer t.Stop()
	defer c.stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
			if err := c.tick(ctx); err != nil && ctx.Err() == nil {
				c.log.Warn("ca maintenance failed; retrying at next poll", "err", err)
			}
		}
	}
}

func (c *CA) stop() {
	c.mu.Lock()
	c.stopped = true
	inter := c.inter
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.retireIntermediate(ctx, inter); err != nil {
		c.log.Warn("record intermediate retired at shutdown", logIntermediate, inter.serial, "err", err)
	}
}

// tick is one pass of Run's maintenance.
func (c *CA) tick(ctx context.Context) error {
	c.tickMu.Lock()
	defer c.tickMu.Unlock()
	var errs []error
	if c.upstream == nil {
		if err := c.advanceRootRotation(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if err := c.maybeRotateIntermediate(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := c.rotateJWTKey(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := c.refreshBundle(ctx); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func randomSerial() (*big.Int, error) {
	b := make([]byte, 16)
	for {
		if _, err := rand.Read(b); err != nil {
			return nil, err
		}
		n := new(big.Int).SetBytes(b)
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

func rootID(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// bootstrapRoot makes sure an active self-managed root exists and loads its
// key.
func (c *CA) bootstrapRoot(ctx context.Context, imported *rootCA) error {
	now := c.clock.Now()
	var active *rootCA
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", caLockKey); err != nil {
			return fmt.Errorf("take ca lock: %w", err)
		}
		r, err := c.loadRoot(ctx, tx, "state = 'active' AND NOT upstream")
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		if err == nil {
			active = r
			if imported != nil && imported.id != r.id {
				c.log.Warn("ignoring the configured root to import: the database already has an active root", logRoot, r.id)
			}
			return nil
		}
		r = imported
		if r == nil {
			if r, err = c.generateRoot(now); err != nil {
				return err
			}
		}
		if err := c.insertRoot(ctx, tx, r, "active", now); err != nil {
			return err
		}
		c.log.Info("created root ca", logRoot, r.id, "imported", imported != nil)
		active = r
		return nil
	})
	if err != nil {
		return fmt.Errorf("load root: %w", err)
	}
	c.rootsMu.Lock()
	c.roots[active.id] = active
	c.rootsMu.Unlock()
	return nil
}

func (c *CA) insertRoot(ctx context.Context, tx pgx.Tx, r *rootCA, state string, now time.Time) error {
	der, err := x509.MarshalPKCS8PrivateKey(r.key)
	if err != nil {
		return fmt.Errorf("marshal root key: %w", err)
	}
	sealed, err := seal(c.kek, rootAAD(r.id), der)
	if err != nil {
		return err
	}
	var activated *time.Time
	if state == "active" {
		activated = &now
	}
	_, err = tx.Exec(ctx, `INSERT INTO ca_roots (id, cert_der, key_sealed, upstream, state, not_after, created_at, activated_at)
		VALUES ($1, $2, $3, false, $4, $5, $6, $7)`, r.id, r.cert.Raw, sealed, state, r.cert.NotAfter, now, activated)
	if err != nil {
		return fmt.Errorf("store root: %w", err)
	}
	return nil
}

// loadRoot reads and unseals the one self-managed root matching where.
func (c *CA) loadRoot(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, where string, args ...any) (*rootCA, error) {
	var id string
	var der, sealed []byte
	err := q.QueryRow(ctx, "SELECT id, cert_der, key_sealed FROM ca_roots WHERE "+where, args...).Scan(&id, &der, &sealed)
	if err != nil {
		return nil, err
	}
	c.rootsMu.Lock()
	r, ok := c.roots[id]
	c.rootsMu.Unlock()
	if ok {
		return r, nil
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse root %s: %w", id, err)
	}
	if sealed == nil {
		return nil, fmt.Errorf("root %s has no key in the database", id)
	}
	plain, err := unseal(c.kek, rootAAD(id), "root key "+id, sealed)
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(plain)
	if err != nil {
		return nil, fmt.Errorf("parse root key %s: %w", id, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("root key %s is not a signing key", id)
	}
	r = &rootCA{id: id, cert: cert, key: signer}
	c.rootsMu.Lock()
	c.roots[id] = r
	c.rootsMu.Unlock()
	return r, nil
}

func (c *CA) generateRoot(now time.Time) (*rootCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate root key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("generate root serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{"Writ"},
			CommonName:   "Writ root CA " + c.td.Name(),
			SerialNumber: serial.Text(16),
		},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(c.set.rootTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{c.td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create root certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse root certificate: %w", err)
	}
	return &rootCA{id: rootID(der), cert: cert, key: key}, nil
}

// parseRootPEM checks an operator-supplied root: a self-signed CA
// certificate, currently valid, whose ECDSA P-256 key is the given one.
func parseRootPEM(certPEM, keyPEM []byte, now time.Time) (*rootCA, error) {
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, errors.New("root certificate: no PEM CERTIFICATE block")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("root certificate: %w", err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, errors.New("root certificate is not a CA certificate")
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		return nil, fmt.Errorf("root certificate is not self-signed: %w", err)
	}
	if now.Before(cert.NotBefore) || now.After(cert.NotAfter) {
		return nil, fmt.Errorf("root certificate is valid from %s to %s, not now", cert.NotBefore.UTC(), cert.NotAfter.UTC())
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, errors.New("root key: no PEM block")
	}
	var key any
	switch kb.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(kb.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(kb.Bytes)
	default:
		return nil, fmt.Errorf("root key: PEM block %q, want PRIVATE KEY or EC PRIVATE KEY", kb.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("root key: %w", err)
	}
	ek, ok := key.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, errors.New("root key: only ECDSA P-256 is supported")
	}
	if !ek.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("root key does not match the root certificate's public key")
	}
	return &rootCA{id: rootID(cert.Raw), cert: cert, key: ek}, nil
}
