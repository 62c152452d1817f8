package authority

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/writmesh/writ/config"
)

// newIntermediate creates a signing intermediate for this replica, signed
// by the active root or by the upstream CA, and records it.
func (c *CA) newIntermediate(ctx context.Context) (*intermediate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate intermediate key: %w", err)
	}
	now := c.clock.Now()
	inter := &intermediate{key: key}
	var upstreamRoots []*x509.Certificate
	if c.upstream != nil {
		csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
			Subject: pkix.Name{Organization: []string{"Writ"}, CommonName: "Writ intermediate CA " + c.replica},
			URIs:    []*url.URL{c.td.ID().URL()},
		}, key)
		if err != nil {
			return nil, fmt.Errorf("create intermediate csr: %w", err)
		}
		csr, err := x509.ParseCertificateRequest(csrDER)
		if err != nil {
			return nil, fmt.Errorf("parse intermediate csr: %w", err)
		}
		chain, roots, err := c.upstream.SignIntermediate(ctx, csr, c.set.interTTL)
		if err != nil {
			return nil, fmt.Errorf("upstream ca: sign intermediate: %w", err)
		}
		if err := checkUpstreamChain(chain, roots, key, now); err != nil {
			return nil, fmt.Errorf("upstream ca: %w", err)
		}
		inter.chain, upstreamRoots = chain, roots
	} else {
		root, err := c.loadRoot(ctx, c.pool, "state = 'active' AND NOT upstream")
		if err != nil {
			return nil, fmt.Errorf("load active root: %w", err)
		}
		serial, err := randomSerial()
		if err != nil {
			return nil, fmt.Errorf("intermediate serial: %w", err)
		}
		notBefore := now.Add(-backdate)
		if notBefore.Before(root.cert.NotBefore) {
			notBefore = root.cert.NotBefore
		}
		notAfter := now.Add(c.set.interTTL)
		if notAfter.After(root.cert.NotAfter) {
			notAfter = root.cert.NotAfter
			c.log.Warn("the active root expires before a full intermediate lifetime; run `writ ca rotate-root`", logRoot, root.id, "root_not_after", root.cert.NotAfter)
		}
		if !notAfter.After(now) {
			return nil, fmt.Errorf("active root %s has expired; rotate the root", root.id)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial,
			Subject: pkix.Name{
				Organization: []string{"Writ"},
				CommonName:   "Writ intermediate CA " + c.replica,
				SerialNumber: serial.Text(16),
			},
			NotBefore:             notBefore,
			NotAfter:              notAfter,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
			BasicConstraintsValid: true,
			IsCA:                  true,
			MaxPathLenZero:        true,
			URIs:                  []*url.URL{c.td.ID().URL()},
			// A stolen intermediate key can mint identities only in our
			// own trust domain.
			PermittedURIDomains: []string{c.td.Name()},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, root.cert, key.Public(), root.key)
		if err != nil {
			return nil, fmt.Errorf("sign intermediate: %w", err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("parse intermediate: %w", err)
		}
		inter.chain = []*x509.Certificate{cert}
		inter.rootID = root.id
	}
	inter.cert = inter.chain[0]
	inter.serial = inter.cert.SerialNumber.Text(16)
	inter.notAfter = inter.cert.NotAfter
	for _, ca := range inter.chain[1:] {
		if ca.NotAfter.Before(inter.notAfter) {
			inter.notAfter = ca.NotAfter
		}
	}
	err = pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		for _, r := range upstreamRoots {
			if _, err := tx.Exec(ctx, `INSERT INTO ca_roots (id, cert_der, upstream, state, not_after, created_at, activated_at)
				VALUES ($1, $2, true, 'active', $3, $4, $4) ON CONFLICT (id) DO NOTHING`, rootID(r.Raw), r.Raw, r.NotAfter, now); err != nil {
				return fmt.Errorf("store upstream root: %w", err)
			}
		}
		var rootRef *string
		if inter.rootID != "" {
			rootRef = &inter.rootID
		}
		if _, err := tx.Exec(ctx, `INSERT INTO ca_intermediates (serial, replica_id, root_id, cert_der, not_before, not_after, created_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7)`, inter.serial, c.replica, rootRef, inter.cert.Raw, inter.cert.NotBefore, inter.cert.NotAfter, now); err != nil {
			return fmt.Errorf("store intermediate: %w", err)
		}
		signer := inter.rootID
		if signer == "" && len(inter.chain) > 1 {
			signer = inter.chain[1].SerialNumber.Text(16)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO issuance_log (at, kind, outcome, serial, spiffe_id, not_after, caller, signer)
			VALUES ($1, 'intermediate', 'issued', $2, $3, $4, $5, $6)`, now, inter.serial, c.td.IDString(), inter.cert.NotAfter, c.replica, signer); err != nil {
			return fmt.Errorf("log intermediate: %w", err)
		}
		if c.onIssu != nil {
			return c.onIssu(ctx, tx, []Issuance{{At: now, Kind: KindIntermediate, Outcome: OutcomeIssued, Serial: inter.serial,
				SPIFFEID: c.td.IDString(), NotAfter: inter.cert.NotAfter, Caller: c.replica, Signer: signer}})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	c.log.Info("created intermediate ca", logIntermediate, inter.serial, logRoot, inter.rootID, "not_after", inter.cert.NotAfter)
	return inter, nil
}

// checkUpstreamChain makes sure the upstream CA returned a CA certificate
// for our key that chains to the roots it named.
func checkUpstreamChain(chain, roots []*x509.Certificate, key *ecdsa.PrivateKey, now time.Time) error {
	if len(chain) == 0 || len(roots) == 0 {
		return errors.New("returned an empty chain or no roots")
	}
	leaf := chain[0]
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return errors.New("returned a certificate for another key")
	}
	if !leaf.BasicConstraintsValid || !leaf.IsCA {
		return errors.New("returned a certificate that is not a CA")
	}
	opts := x509.VerifyOptions{Roots: x509.NewCertPool(), Intermediates: x509.NewCertPool(), CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
	for _, r := range roots {
		opts.Roots.AddCert(r)
	}
	for _, ca := range chain[1:] {
		opts.Intermediates.AddCert(ca)
	}
	if _, err := leaf.Verify(opts); err != nil {
		return fmt.Errorf("returned an intermediate that does not chain to its roots: %w", err)
	}
	return nil
}

// maybeRotateIntermediate replaces this replica's intermediate at half its
// life, or at once when the active root is no longer the one that signed it.
func (c *CA) maybeRotateIntermediate(ctx context.Context) error {
	c.mu.RLock()
	cur, stopped := c.inter, c.stopped
	c.mu.RUnlock()
	if stopped {
		return nil
	}
	now := c.clock.Now()
	half := cur.cert.NotBefore.Add(cur.cert.NotAfter.Sub(cur.cert.NotBefore) / 2)
	reason := ""
	if !now.Before(half) {
		reason = "half life"
	} else if c.upstream == nil {
		var active string
		err := c.pool.QueryRow(ctx, "SELECT id FROM ca_roots WHERE state = 'active' AND NOT upstream").Scan(&active)
		if err != nil {
			return fmt.Errorf("read active root: %w", err)
		}
		if active != cur.rootID {
			reason = "root rotated"
		}
	}
	if reason == "" {
		return nil
	}
	next, err := c.newIntermediate(ctx)
	if err != nil {
		return fmt.Errorf("rotate intermediate (%s): %w", reason, err)
	}
	c.mu.Lock()
	c.inter = next
	c.mu.Unlock()
	c.log.Info("rotated intermediate ca", "reason", reason, logIntermediate, next.serial, "previous", cur.serial)
	// The swap is done: the record of cur's retirement must follow even
	// if Run is being stopped now, or cur stays unretired (stop retires
	// only the intermediate in force).
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	return c.retireIntermediate(rctx, cur)
}

// retireIntermediate records that inter signs no more and the latest expiry
// of what it signed. The caller has swapped it out under mu, so no signer
// still holds it.
func (c *CA) retireIntermediate(ctx context.Context, inter *intermediate) error {
	var last *time.Time
	if n := inter.maxLeaf.Load(); n != 0 {
		t := time.Unix(0, n)
		last = &t
	}
	_, err := c.pool.Exec(ctx, `UPDATE ca_intermediates SET retired_at = $2, last_leaf_not_after = $3 WHERE serial = $1 AND retired_at IS NULL`,
		inter.serial, c.clock.Now(), last)
	if err != nil {
		return fmt.Errorf("retire intermediate %s: %w", inter.serial, err)
	}
	return nil
}

// SignX509SVID signs an X.509 SVID for req.ID with this replica's
// intermediate. The lifetime is req.TTL (0: the configured default), raised
// to config.MinSVIDTTL, capped at the configured maximum and never beyond
// the signing chain's expiry. The leaf has the SPIFFE ID as its only SAN, a
// random 128-bit serial, and server and client auth EKUs. It does not
// touch the database (callers that know the node and entry log the
// issuance), so it is fast; it is safe for concurrent use.
func (c *CA) SignX509SVID(ctx context.Context, req X509Request) (*IssuedX509, error) {
	if req.ID.IsZero() || !req.ID.MemberOf(c.td) {
		return nil, fmt.Errorf("sign x509 svid: %q is not in trust domain %q", req.ID.String(), c.td.Name())
	}
	if req.CSR == nil {
		return nil, errors.New("sign x509 svid: csr is missing")
	}
	pub, ok := req.CSR.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("sign x509 svid: csr key is %s: only ECDSA P-256 keys are accepted", keyKind(req.CSR.PublicKey))
	}
	if err := CheckCSRFor(req.CSR, req.ID); err != nil {
		return nil, fmt.Errorf("sign x509 svid: %w", err)
	}
	if req.TTL < 0 {
		return nil, fmt.Errorf("sign x509 svid: negative ttl %s", req.TTL)
	}
	ttl := req.TTL
	if ttl == 0 {
		ttl = c.set.x509TTL
	}
	ttl = min(max(ttl, config.MinSVIDTTL), c.set.x509Max)
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("sign x509 svid: serial: %w", err)
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("sign x509 svid: %w", err)
	}

	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.stopped {
		return nil, errors.New("sign x509 svid: ca is shutting down")
	}
	inter := c.inter
	now := c.clock.Now()
	notBefore := now.Add(-backdate)
	if notBefore.Before(inter.cert.NotBefore) {
		notBefore = inter.cert.NotBefore
	}
	notAfter := now.Add(ttl)
	if notAfter.After(inter.notAfter) {
		notAfter = inter.notAfter
	}
	if !notAfter.After(now) {
		return nil, errors.New("sign x509 svid: signing intermediate has expired")
	}
	der, err := signLeaf(leafSpec{
		serial:    serial,
		notBefore: notBefore.Truncate(time.Second),
		notAfter:  notAfter.Truncate(time.Second),
		spki:      spki,
		uri:       req.ID.String(),
	}, inter.cert, inter.key)
	if err != nil {
		return nil, fmt.Errorf("sign x509 svid: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("sign x509 svid: parse: %w", err)
	}
	for n := leaf.NotAfter.UnixNano(); ; {
		cur := inter.maxLeaf.Load()
		if cur >= n || inter.maxLeaf.CompareAndSwap(cur, n) {
			break
		}
	}
	chain := make([]*x509.Certificate, 0, 1+len(inter.chain))
	chain = append(chain, leaf)
	chain = append(chain, inter.chain...)
	return &IssuedX509{
		Chain:    chain,
		Serial:   serial.Text(16),
		NotAfter: leaf.NotAfter,
		Signer:   inter.serial,
	}, nil
}
