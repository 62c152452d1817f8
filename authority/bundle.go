package authority

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/jackc/pgx/v5"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

// refreshBundle rebuilds the bundle from the database: every root not yet
// retired and every JWT key not yet expired (expired keys are deleted). The
// shared spiffe_sequence is bumped, under a row lock, only when the content
// differs from what it was last computed for, so every replica publishes
// the same sequence for the same content.
func (c *CA) refreshBundle(ctx context.Context) error {
	c.bundleMu.Lock()
	defer c.bundleMu.Unlock()
	now := c.clock.Now()
	b := spiffebundle.New(c.td)
	b.SetRefreshHint(c.set.hint)
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		var seq int64
		var digest []byte
		if err := tx.QueryRow(ctx, "SELECT sequence, digest FROM bundle_state WHERE id FOR UPDATE").Scan(&seq, &digest); err != nil {
			return fmt.Errorf("read bundle state: %w", err)
		}
		if _, err := tx.Exec(ctx, "DELETE FROM jwt_keys WHERE not_after <= $1", now); err != nil {
			return fmt.Errorf("drop expired jwt keys: %w", err)
		}
		h := sha256.New()
		put := func(tag byte, parts ...[]byte) {
			h.Write([]byte{tag})
			for _, p := range parts {
				var n [8]byte
				binary.BigEndian.PutUint64(n[:], uint64(len(p)))
				h.Write(n[:])
				h.Write(p)
			}
		}
		type root struct {
			id  string
			der []byte
		}
		var roots []root
		rows, err := tx.Query(ctx, "SELECT id, cert_der FROM ca_roots WHERE state <> 'retired'")
		if err != nil {
			return fmt.Errorf("read roots: %w", err)
		}
		for rows.Next() {
			var r root
			if err := rows.Scan(&r.id, &r.der); err != nil {
				rows.Close()
				return fmt.Errorf("read roots: %w", err)
			}
			roots = append(roots, r)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("read roots: %w", err)
		}
		sort.Slice(roots, func(i, j int) bool { return roots[i].id < roots[j].id })
		for _, r := range roots {
			cert, err := x509.ParseCertificate(r.der)
			if err != nil {
				return fmt.Errorf("parse root %s: %w", r.id, err)
			}
			b.AddX509Authority(cert)
			put('x', r.der)
		}
		rows, err = tx.Query(ctx, "SELECT kid, public_key_der FROM jwt_keys ORDER BY kid")
		if err != nil {
			return fmt.Errorf("read jwt keys: %w", err)
		}
		for rows.Next() {
			var kid string
			var der []byte
			if err := rows.Scan(&kid, &der); err != nil {
				rows.Close()
				return fmt.Errorf("read jwt keys: %w", err)
			}
			pub, err := x509.ParsePKIXPublicKey(der)
			if err != nil {
				rows.Close()
				return fmt.Errorf("parse jwt key %s: %w", kid, err)
			}
			if err := b.AddJWTAuthority(kid, pub); err != nil {
				rows.Close()
				return fmt.Errorf("add jwt key %s: %w", kid, err)
			}
			put('j', []byte(kid), der)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("read jwt keys: %w", err)
		}
		sum := h.Sum(nil)
		if string(sum) != string(digest) {
			seq++
			if _, err := tx.Exec(ctx, "UPDATE bundle_state SET sequence = $1, digest = $2, updated_at = $3 WHERE id", seq, sum, now); err != nil {
				return fmt.Errorf("bump bundle sequence: %w", err)
			}
			c.log.Info("trust bundle changed", "sequence", seq, "x509_authorities", len(roots))
		}
		b.SetSequenceNumber(uint64(seq))
		return nil
	})
	if err != nil {
		return fmt.Errorf("refresh bundle: %w", err)
	}
	c.bundle.Store(b)
	return nil
}
