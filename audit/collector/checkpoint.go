package collector

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Head is one source's chain head in a checkpoint.
type Head struct {
	Source string `json:"source"`
	Seq    uint64 `json:"seq"` // also the number of events: seqs start at 1
	Hash   string `json:"hash"`
}

// CheckpointBody is the signed document. Its JSON encoding (struct field
// order, heads sorted by source) is what the signature covers.
type CheckpointBody struct {
	Time  time.Time `json:"time"`
	Heads []Head    `json:"heads"`
}

// Checkpointer periodically signs the chain heads with writd's
// control-plane key. The key never leaves the process: Certificate returns
// the current SVID, whose PrivateKey signs in place. It is used by one
// goroutine (Run).
type Checkpointer struct {
	Pool        *pgxpool.Pool
	Certificate func() *tls.Certificate
	Interval    time.Duration // default 1 minute
	Clock       clockwork.Clock
	Logger      *slog.Logger
	last        string
}

// Run writes a checkpoint whenever the heads changed, every Interval,
// until ctx ends.
func (c *Checkpointer) Run(ctx context.Context) error {
	if c.Interval <= 0 {
		c.Interval = time.Minute
	}
	if c.Clock == nil {
		c.Clock = clockwork.NewRealClock()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	for {
		if _, err := c.Write(ctx); err != nil && ctx.Err() == nil {
			c.Logger.Warn("audit checkpoint", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-c.Clock.After(c.Interval):
		}
	}
}

// Write signs and stores the current heads unless they are unchanged since
// the last checkpoint this Checkpointer wrote; it reports whether it wrote.
func (c *Checkpointer) Write(ctx context.Context) (bool, error) {
	if c.Clock == nil {
		c.Clock = clockwork.NewRealClock()
	}
	rows, err := c.Pool.Query(ctx, "SELECT source, last_seq, last_hash FROM audit_sources ORDER BY source")
	if err != nil {
		return false, fmt.Errorf("checkpoint heads: %w", err)
	}
	heads, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Head, error) {
		var h Head
		var seq int64
		var hash []byte
		err := r.Scan(&h.Source, &seq, &hash)
		h.Seq, h.Hash = uint64(seq), hex.EncodeToString(hash)
		return h, err
	})
	if err != nil {
		return false, fmt.Errorf("checkpoint heads: %w", err)
	}
	if len(heads) == 0 {
		return false, nil
	}
	key, _ := json.Marshal(heads)
	if string(key) == c.last {
		return false, nil
	}
	cert := c.Certificate()
	if cert == nil || len(cert.Certificate) == 0 {
		return false, errors.New("checkpoint: no control-plane certificate")
	}
	signer, ok := cert.PrivateKey.(crypto.Signer)
	if !ok {
		return false, errors.New("checkpoint: the control-plane key cannot sign")
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return false, fmt.Errorf("checkpoint: %w", err)
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return false, fmt.Errorf("checkpoint: %w", err)
	}
	now := c.Clock.Now().UTC().Truncate(time.Microsecond)
	body, err := json.Marshal(CheckpointBody{Time: now, Heads: heads})
	if err != nil {
		return false, err
	}
	digest := sha256.Sum256(body)
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return false, fmt.Errorf("checkpoint: sign: %w", err)
	}
	if _, err := c.Pool.Exec(ctx, `INSERT INTO audit_checkpoints (created_at, signer, body, signature, cert_chain) VALUES ($1, $2, $3, $4, $5)`,
		now, id.String(), body, sig, cert.Certificate); err != nil {
		return false, fmt.Errorf("checkpoint: store: %w", err)
	}
	c.last = string(key)
	return true, nil
}

// checkCheckpoints verifies every checkpoint's signature against roots (at
// the checkpoint's time: SVIDs are short-lived) and that each head it
// signed is still in the table with the same hash.
func checkCheckpoints(ctx context.Context, pool *pgxpool.Pool, roots *x509.CertPool, signer string, from, to time.Time, res *VerifyResult) error {
	if to.IsZero() {
		to = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)
	}
	rows, err := pool.Query(ctx, "SELECT id, created_at, body, signature, cert_chain FROM audit_checkpoints WHERE created_at >= $1 AND created_at < $2 ORDER BY id", from, to)
	if err != nil {
		return err
	}
	type cp struct {
		ID    int64
		At    time.Time
		Body  []byte
		Sig   []byte
		Chain [][]byte
	}
	cps, err := pgx.CollectRows(rows, pgx.RowToStructByPos[cp])
	if err != nil {
		return err
	}
	for _, c := range cps {
		res.Checkpoints++
		bad := func(problem string) {
			res.Breaks = append(res.Breaks, Break{Problem: fmt.Sprintf("checkpoint %d (%s): %s", c.ID, c.At.UTC().Format(time.RFC3339), problem)})
		}
		if len(c.Chain) == 0 {
			bad("no certificate")
			continue
		}
		certs := make([]*x509.Certificate, 0, len(c.Chain))
		for _, der := range c.Chain {
			x, err := x509.ParseCertificate(der)
			if err != nil {
				bad("unparseable certificate")
				continue
			}
			certs = append(certs, x)
		}
		inter := x509.NewCertPool()
		for _, x := range certs[1:] {
			inter.AddCert(x)
		}
		if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: c.At, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			bad("signer certificate does not verify against the trust bundle: " + err.Error())
			continue
		}
		if id, err := x509svid.IDFromCert(certs[0]); err != nil || id.String() != signer {
			bad(fmt.Sprintf("signed by %v, not by %s", id, signer))
			continue
		}
		pub, ok := certs[0].PublicKey.(*ecdsa.PublicKey)
		digest := sha256.Sum256(c.Body)
		if !ok || !ecdsa.VerifyASN1(pub, digest[:], c.Sig) {
			bad("signature does not verify (checkpoint altered)")
			continue
		}
		var body CheckpointBody
		if err := json.Unmarshal(c.Body, &body); err != nil {
			bad("unreadable body")
			continue
		}
		for _, h := range body.Heads {
			var hash []byte
			err := pool.QueryRow(ctx, "SELECT hash FROM audit_events WHERE source = $1 AND seq = $2 ORDER BY time LIMIT 1", h.Source, int64(h.Seq)).Scan(&hash)
			switch {
			case errors.Is(err, pgx.ErrNoRows):
				res.Breaks = append(res.Breaks, Break{Source: h.Source, Seq: h.Seq, Problem: fmt.Sprintf("signed checkpoint %d has this event as the chain head; it is missing (deleted?)", c.ID)})
			case err != nil:
				return err
			case hex.EncodeToString(hash) != h.Hash:
				res.Breaks = append(res.Breaks, Break{Source: h.Source, Seq: h.Seq, Problem: fmt.Sprintf("hash differs from signed checkpoint %d (chain rewritten?)", c.ID)})
			}
		}
	}
	return nil
}
