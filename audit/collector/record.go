package collector

import (
	"context"
	"fmt"
	"strconv"

	"github.com/jackc/pgx/v5"

	"github.com/writmesh/writ/audit"
)

// Record appends an event that writd itself records (a configuration or
// policy change, a certificate issued or refused, a login) straight into
// PostgreSQL, chained under source. See RecordTx.
func (c *Collector) Record(ctx context.Context, source string, ev *audit.Event) error {
	if err := c.EnsurePartition(ctx, ev.Time); err != nil {
		return err
	}
	return pgx.BeginFunc(ctx, c.o.Pool, func(tx pgx.Tx) error {
		if err := c.asyncCommit(ctx, tx); err != nil {
			return err
		}
		return c.recordTx(ctx, tx, source, ev)
	})
}

// RecordBatch appends evs under source in one transaction, all or none
// (an AuthZEN batch's answers, for instance).
func (c *Collector) RecordBatch(ctx context.Context, source string, evs []*audit.Event) error {
	for _, ev := range evs {
		if err := c.EnsurePartition(ctx, ev.Time); err != nil {
			return err
		}
	}
	return pgx.BeginFunc(ctx, c.o.Pool, func(tx pgx.Tx) error {
		if err := c.asyncCommit(ctx, tx); err != nil {
			return err
		}
		return c.recordManyTx(ctx, tx, source, evs)
	})
}

// RecordTx appends ev inside tx, the transaction that makes the change the
// event records, so that the change and its audit event commit together or
// not at all: exactly once with no spool. The chain head of source is
// locked (SELECT … FOR UPDATE on audit_sources) until tx ends, which orders
// the events of one source across replicas. source should name the
// recording replica (several replicas share the control-plane SPIFFE ID),
// e.g. "spiffe://TD/writ/control-plane/replica/NAME". ev's Source, Seq,
// PrevHash and Hash are set here.
func (c *Collector) RecordTx(ctx context.Context, tx pgx.Tx, source string, ev *audit.Event) error {
	// The partition DDL runs in its own transaction: it must not wait on
	// locks tx holds, and it is idempotent.
	if err := c.EnsurePartition(ctx, ev.Time); err != nil {
		return err
	}
	return c.recordTx(ctx, tx, source, ev)
}

func (c *Collector) recordTx(ctx context.Context, tx pgx.Tx, source string, ev *audit.Event) error {
	return c.recordManyTx(ctx, tx, source, []*audit.Event{ev})
}

// RecordManyTx is RecordTx for several events (the rows of one issuance
// call, say): the chain head is locked and updated once and the events
// are inserted in one round trip.
func (c *Collector) RecordManyTx(ctx context.Context, tx pgx.Tx, source string, evs []*audit.Event) error {
	for _, ev := range evs {
		if err := c.EnsurePartition(ctx, ev.Time); err != nil {
			return err
		}
	}
	return c.recordManyTx(ctx, tx, source, evs)
}

func (c *Collector) recordManyTx(ctx context.Context, tx pgx.Tx, source string, evs []*audit.Event) error {
	if len(evs) == 0 {
		return nil
	}
	for _, ev := range evs {
		if err := ev.Validate(); err != nil {
			return fmt.Errorf("audit record: %w", err)
		}
		attrs, err := audit.CanonicalJSON(ev.Attributes)
		if err != nil {
			return fmt.Errorf("audit record: %w", err)
		}
		ev.Attributes = attrs
		ev.Time = audit.NormalizeTime(ev.Time)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO audit_sources (source, last_seq, last_hash) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING`,
		source, make([]byte, audit.HashSize)); err != nil {
		return fmt.Errorf("audit record: %w", err)
	}
	var last int64
	var hash []byte
	if err := tx.QueryRow(ctx, `SELECT last_seq, last_hash FROM audit_sources WHERE source = $1 FOR UPDATE`, source).Scan(&last, &hash); err != nil {
		return fmt.Errorf("audit record: chain head: %w", err)
	}
	b := &pgx.Batch{}
	for _, ev := range evs {
		last++
		ev.Source, ev.Seq = source, uint64(last)
		copy(ev.PrevHash[:], hash)
		ev.Seal()
		hash = ev.Hash[:]
		b.Queue(`INSERT INTO audit_events (id, time, kind, source, seq, prev_hash, hash, principal, destination,
		action, resource, result, status, reason, cause, policy_revision, trace_id, attributes)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)`,
			ev.ID, ev.Time, ev.Kind, ev.Source, int64(ev.Seq), ev.PrevHash[:], ev.Hash[:], ev.Principal, ev.Destination,
			ev.Action, ev.Resource, ev.Result, int32(ev.Status), ev.Reason, ev.Cause, ev.PolicyRevision, ev.TraceID, string(ev.Attributes))
	}
	b.Queue(`UPDATE audit_sources SET last_seq = $2, last_hash = $3, updated_at = now() WHERE source = $1`, source, last, hash)
	b.Queue("SELECT pg_notify($1, $2)", NotifyChannel, source+"\t"+strconv.FormatUint(evs[0].Seq, 10)+"\t"+strconv.FormatInt(last, 10))
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("audit record: insert: %w", err)
	}
	return nil
}

func (c *Collector) asyncCommit(ctx context.Context, tx pgx.Tx) error {
	if !c.o.AsyncCommit {
		return nil
	}
	if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = off"); err != nil {
		return fmt.Errorf("audit record: %w", err)
	}
	return nil
}
