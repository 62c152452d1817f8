package authority

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/jackc/pgx/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Bounds on JWT-SVID audiences, which come from callers.
const (
	maxAudiences   = 16
	maxAudienceLen = 255
)

// jwtKey is one of this replica's JWT-SVID signing keys. It is published
// (in jwt_keys, hence the bundle) from createdAt, signs from activeAt, and
// stays in the bundle until notAfter, by which every token it signed has
// expired.
type jwtKey struct {
	kid                 string
	signer              jose.Signer
	createdAt, activeAt time.Time
	notAfter            time.Time
}

// newJWTKey creates and publishes a JWT signing key. It signs after two
// bundle refresh hints, except the first key of a replica in a trust
// domain whose bundle has no JWT key yet: no verifier can exist whose bundle
// lacks it, so it signs at once.
func (c *CA) newJWTKey(ctx context.Context, first bool) (*jwtKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate jwt key: %w", err)
	}
	kidb := make([]byte, 16)
	if _, err := rand.Read(kidb); err != nil {
		return nil, fmt.Errorf("generate jwt key id: %w", err)
	}
	kid := hex.EncodeToString(kidb)
	pub, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, fmt.Errorf("marshal jwt key: %w", err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("jwt signer: %w", err)
	}
	// With a KEK the private key is also kept sealed, like the root's, so
	// that a restarted replica can go on signing with it (adoptJWTKey)
	// instead of waiting for a new key to reach every verifier.
	var sealed []byte
	if c.kek != nil {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, fmt.Errorf("marshal jwt key: %w", err)
		}
		if sealed, err = seal(c.kek, jwtAAD(kid), der); err != nil {
			return nil, err
		}
	}
	now := c.clock.Now()
	k := &jwtKey{kid: kid, signer: signer, createdAt: now, activeAt: now.Add(c.set.publishDelay()), notAfter: now.Add(c.set.jwtKeyTTL)}
	if first {
		// Under the CA lock, so two replicas starting together cannot both
		// find the bundle without JWT keys.
		inserted := false
		err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", caLockKey); err != nil {
				return fmt.Errorf("take ca lock: %w", err)
			}
			tag, err := tx.Exec(ctx, `INSERT INTO jwt_keys (kid, public_key_der, replica_id, created_at, active_at, not_after, key_sealed)
				SELECT $1, $2, $3, $4, $4, $5, $6
				WHERE NOT EXISTS (SELECT 1 FROM jwt_keys WHERE not_after > $4)`,
				kid, pub, c.replica, now, k.notAfter, sealed)
			inserted = err == nil && tag.RowsAffected() == 1
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("publish jwt key: %w", err)
		}
		if inserted {
			k.activeAt = now
			c.log.Info("published jwt signing key, signing at once (first in trust domain)", logKeyID, kid)
			return k, nil
		}
	}
	if _, err := c.pool.Exec(ctx, `INSERT INTO jwt_keys (kid, public_key_der, replica_id, created_at, active_at, not_after, key_sealed)
		VALUES ($1, $2, $3, $4, $5, $6, $7)`, kid, pub, c.replica, now, k.activeAt, k.notAfter, sealed); err != nil {
		return nil, fmt.Errorf("publish jwt key: %w", err)
	}
	c.log.Info("published jwt signing key", logKeyID, kid, "signs_from", k.activeAt)
	return k, nil
}

// adoptJWTKey finds a sealed key that verifiers already trust and that can
// still sign tokens of the maximum lifetime, and opens it: a replica that
// starts (or restarts) while such a key exists signs with it until its own
// new key has been published long enough. Without it, a restarted
// single-replica writd could not issue JWT-SVIDs for two refresh hints.
// It returns nil when there is no such key.
func (c *CA) adoptJWTKey(ctx context.Context) (*jwtKey, error) {
	if c.kek == nil {
		return nil, nil
	}
	now := c.clock.Now()
	var k jwtKey
	var sealed []byte
	err := c.pool.QueryRow(ctx, `SELECT kid, key_sealed, created_at, active_at, not_after FROM jwt_keys
		WHERE key_sealed IS NOT NULL AND active_at <= $1 AND not_after > $2
		ORDER BY active_at DESC LIMIT 1`, now, now.Add(c.set.jwtMax)).Scan(&k.kid, &sealed, &k.createdAt, &k.activeAt, &k.notAfter)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("adopt jwt key: %w", err)
	}
	der, err := unseal(c.kek, jwtAAD(k.kid), "jwt key "+k.kid, sealed)
	if err != nil {
		return nil, fmt.Errorf("adopt jwt key: %w", err)
	}
	priv, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("adopt jwt key %s: %w", k.kid, err)
	}
	ec, ok := priv.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("adopt jwt key %s: not an ECDSA key", k.kid)
	}
	if k.signer, err = jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: ec, KeyID: k.kid}},
		(&jose.SignerOptions{}).WithType("JWT")); err != nil {
		return nil, fmt.Errorf("adopt jwt key %s: %w", k.kid, err)
	}
	c.log.Info("signing with a published jwt key until this replica's own is usable", logKeyID, k.kid)
	return &k, nil
}

// rotateJWTKey prepares the next key at half the current key's life and
// switches to it once it has been published for two refresh hints. The
// current key's tokens end by its notAfter, which is why NewCA requires the
// key lifetime to exceed twice (publish delay + maximum token TTL).
func (c *CA) rotateJWTKey(ctx context.Context) error {
	now := c.clock.Now()
	c.mu.RLock()
	cur, next := c.jwtCur, c.jwtNext
	c.mu.RUnlock()
	if next == nil && !now.Before(cur.createdAt.Add(c.set.jwtKeyTTL/2)) {
		k, err := c.newJWTKey(ctx, false)
		if err != nil {
			return fmt.Errorf("rotate jwt key: %w", err)
		}
		c.mu.Lock()
		c.jwtNext = k
		c.mu.Unlock()
		next = k
	}
	if next != nil && !now.Before(next.activeAt) {
		c.mu.Lock()
		c.jwtCur, c.jwtNext = next, nil
		c.mu.Unlock()
		c.log.Info("switched jwt signing key", logKeyID, next.kid, "previous", cur.kid)
	}
	return nil
}

// SignJWTSVID signs an ES256 JWT-SVID for id. The audience is required;
// the lifetime is ttl (0: the configured default), capped at the configured
// maximum and at the signing key's end of publication. It is safe for
// concurrent use.
func (c *CA) SignJWTSVID(ctx context.Context, id spiffeid.ID, audience []string, ttl time.Duration) (*IssuedJWT, error) {
	if id.IsZero() || !id.MemberOf(c.td) {
		return nil, fmt.Errorf("sign jwt svid: %q is not in trust domain %q", id.String(), c.td.Name())
	}
	if len(audience) == 0 {
		return nil, errors.New("sign jwt svid: an audience is required")
	}
	if len(audience) > maxAudiences {
		return nil, fmt.Errorf("sign jwt svid: %d audiences, at most %d allowed", len(audience), maxAudiences)
	}
	for _, a := range audience {
		if a == "" || len(a) > maxAudienceLen {
			return nil, fmt.Errorf("sign jwt svid: each audience must be 1 to %d characters", maxAudienceLen)
		}
	}
	if ttl < 0 {
		return nil, fmt.Errorf("sign jwt svid: negative ttl %s", ttl)
	}
	if ttl == 0 {
		ttl = c.set.jwtTTL
	}
	ttl = min(ttl, c.set.jwtMax)
	now := c.clock.Now()
	c.mu.RLock()
	k, stopped := c.jwtCur, c.stopped
	c.mu.RUnlock()
	if stopped {
		return nil, errors.New("sign jwt svid: ca is shutting down")
	}
	if now.Before(k.activeAt) {
		return nil, fmt.Errorf("sign jwt svid: this replica's signing key is still being published to verifiers, usable from %s", k.activeAt.UTC().Format(time.RFC3339))
	}
	exp := now.Add(ttl)
	if exp.After(k.notAfter) {
		exp = k.notAfter
	}
	if !exp.After(now) {
		return nil, errors.New("sign jwt svid: signing key has expired")
	}
	claims := jwt.Claims{
		Subject:  id.String(),
		Audience: jwt.Audience(audience),
		Expiry:   jwt.NewNumericDate(exp),
		IssuedAt: jwt.NewNumericDate(now),
	}
	tok, err := jwt.Signed(k.signer).Claims(claims).Serialize()
	if err != nil {
		return nil, fmt.Errorf("sign jwt svid: %w", err)
	}
	return &IssuedJWT{Token: tok, ExpiresAt: exp.Truncate(time.Second), KeyID: k.kid}, nil
}
