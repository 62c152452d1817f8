package collector

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/writmesh/writ/audit"
)

// Break is one place where a source's chain does not hold.
type Break struct {
	Source  string `json:"source"`
	Seq     uint64 `json:"seq"`
	ID      string `json:"id,omitempty"`
	Problem string `json:"problem"`
}

// VerifyResult is what Verify found.
type VerifyResult struct {
	Sources     int     `json:"sources"`
	Events      int64   `json:"events"`
	Checkpoints int     `json:"checkpoints"`
	Breaks      []Break `json:"breaks"`
}

// VerifyOptions select what Verify checks.
type VerifyOptions struct {
	// From and To bound the events' times ([From, To)); zero leaves that
	// end open.
	From, To time.Time
	// Roots are the trust bundle's X.509 authorities. When set, signed
	// checkpoints (created in the range) are checked too, and each must be
	// signed by Signer (writd's control-plane SPIFFE ID): a workload's SVID
	// chains to the same roots but may not vouch for the trail.
	Roots  *x509.CertPool
	Signer string
}

// OK reports an intact trail.
func (r VerifyResult) OK() bool { return len(r.Breaks) == 0 }

const selectEvents = `SELECT id, time, kind, source, seq, prev_hash, hash, principal, destination,
	action, resource, result, status, reason, cause, policy_revision, trace_id, attributes::text
FROM audit_events`

// scanEvent rebuilds an event from a row of selectEvents. Attributes are
// re-canonicalized from PostgreSQL's jsonb text, which gives back the
// hashed bytes (audit.CanonicalJSON).
func scanEvent(row pgx.CollectableRow) (audit.Event, error) {
	var (
		e          audit.Event
		seq        int64
		status     int32
		prev, hash []byte
		attrs      string
		id         uuid.UUID
		t          time.Time
	)
	if err := row.Scan(&id, &t, &e.Kind, &e.Source, &seq, &prev, &hash, &e.Principal, &e.Destination,
		&e.Action, &e.Resource, &e.Result, &status, &e.Reason, &e.Cause, &e.PolicyRevision, &e.TraceID, &attrs); err != nil {
		return e, err
	}
	e.ID, e.Time, e.Seq, e.Status = id, t.UTC(), uint64(seq), int(status)
	copy(e.PrevHash[:], prev)
	copy(e.Hash[:], hash)
	a, err := audit.CanonicalJSON([]byte(attrs))
	if err != nil {
		return e, err
	}
	e.Attributes = a
	return e, nil
}

// Verify recomputes every event's hash in [from, to) (zero times leave
// that end open) and follows each source's chain: sequence numbers must
// run without gap or repeat, each prev_hash must be the previous event's
// hash, and with an open start every chain must begin at 1; with an open
// end every chain must reach the head the collector recorded. With roots,
// every signed checkpoint in the range must verify and its heads must
// still be in the table unchanged. It names the first broken link of each
// source.
func Verify(ctx context.Context, pool *pgxpool.Pool, o VerifyOptions) (VerifyResult, error) {
	from, to := o.From, o.To
	q := selectEvents + " WHERE true"
	var args []any
	if !from.IsZero() {
		args = append(args, from)
		q += fmt.Sprintf(" AND time >= $%d", len(args))
	}
	if !to.IsZero() {
		args = append(args, to)
		q += fmt.Sprintf(" AND time < $%d", len(args))
	}
	q += " ORDER BY source, seq, id"
	rows, err := pool.Query(ctx, q, args...)
	if err != nil {
		return VerifyResult{}, fmt.Errorf("verify: %w", err)
	}
	var (
		res    VerifyResult
		cur    string
		prev   audit.Event
		broken bool
		lasts  = map[string]uint64{}
	)
	fail := func(e audit.Event, seq uint64, problem string) {
		if !broken {
			res.Breaks = append(res.Breaks, Break{Source: e.Source, Seq: seq, ID: e.ID.String(), Problem: problem})
			broken = true
		}
	}
	defer rows.Close()
	for rows.Next() {
		e, err := scanEvent(rows)
		if err != nil {
			return res, fmt.Errorf("verify: %w", err)
		}
		res.Events++
		first := e.Source != cur
		if first {
			cur, broken = e.Source, false
			res.Sources++
		}
		if e.ComputeHash() != e.Hash {
			fail(e, e.Seq, "content does not match its hash (altered)")
		}
		switch {
		case first:
			if from.IsZero() && e.Seq != 1 {
				fail(e, 1, fmt.Sprintf("chain starts at seq %d: events 1..%d are missing (deleted?)", e.Seq, e.Seq-1))
			}
			if e.Seq == 1 && e.PrevHash != (audit.Hash{}) {
				fail(e, 1, "first event has a previous hash")
			}
		case e.Seq == prev.Seq:
			fail(e, e.Seq, "sequence number repeated (inserted or duplicated event)")
		case e.Seq != prev.Seq+1:
			fail(e, prev.Seq+1, fmt.Sprintf("events %d..%d are missing (deleted?)", prev.Seq+1, e.Seq-1))
		case e.PrevHash != prev.Hash:
			fail(e, e.Seq, "previous hash does not match the previous event (altered, inserted or reordered)")
		}
		lasts[e.Source] = e.Seq
		prev = e
	}
	if err := rows.Err(); err != nil {
		return res, fmt.Errorf("verify: %w", err)
	}
	if o.Roots != nil {
		if o.Signer == "" {
			return res, errors.New("verify: checkpoints need the expected signer")
		}
		if err := checkCheckpoints(ctx, pool, o.Roots, o.Signer, from, to, &res); err != nil {
			return res, fmt.Errorf("verify checkpoints: %w", err)
		}
	}
	if to.IsZero() {
		heads, err := pool.Query(ctx, "SELECT source, last_seq FROM audit_sources ORDER BY source")
		if err != nil {
			return res, fmt.Errorf("verify: %w", err)
		}
		type head struct {
			Source string
			Last   int64
		}
		hs, err := pgx.CollectRows(heads, pgx.RowToStructByPos[head])
		if err != nil {
			return res, fmt.Errorf("verify: %w", err)
		}
		for _, h := range hs {
			got, ok := lasts[h.Source]
			if !ok && from.IsZero() {
				res.Breaks = append(res.Breaks, Break{Source: h.Source, Seq: 1, Problem: fmt.Sprintf("all %d events are missing", h.Last)})
			} else if ok && got < uint64(h.Last) {
				res.Breaks = append(res.Breaks, Break{Source: h.Source, Seq: got + 1, Problem: fmt.Sprintf("events %d..%d at the end of the chain are missing (deleted?)", got+1, h.Last)})
			}
		}
	}
	return res, nil
}

// Events returns the events of source in seq order (tests and tools).
func Events(ctx context.Context, pool *pgxpool.Pool, source string) ([]audit.Event, error) {
	rows, err := pool.Query(ctx, selectEvents+" WHERE source = $1 ORDER BY seq, id", source)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, scanEvent)
}
