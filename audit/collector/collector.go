// Package collector is writd's end of the audit pipeline: the gRPC
// service that receives batches from shippers, checks that every event
// belongs to the caller, and inserts them into PostgreSQL exactly once; the
// daily partitions of audit_events; and retention by dropping partitions.
//
// It is a subpackage so that the enforcer and the proxy, which import
// audit for the spool, do not link pgx. Several writd replicas may run
// collectors against one database at once.
package collector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/internal/svidpeer"
)

// MaxClockSkew is how far in the future an event's time may be; later
// events are refused, so a source cannot create partitions at will.
const MaxClockSkew = 10 * time.Minute

// Options configure a Collector.
type Options struct {
	Pool *pgxpool.Pool
	// PartitionsAhead is how many days of partitions Run keeps created
	// beyond today (default 3).
	PartitionsAhead int
	// AsyncCommit lets Record and RecordBatch commit with
	// synchronous_commit off: PostgreSQL's WAL writer flushes them in
	// groups (within 3 × wal_writer_delay, 600 ms by default), so a crash
	// of the database server can lose that last window of them, while
	// the commit costs no WAL flush. RecordTx (changes) and shipped
	// batches always commit synchronously.
	AsyncCommit bool
	Clock       clockwork.Clock
	Logger      *slog.Logger
	Registerer  prometheus.Registerer
}

// Collector inserts audit events. It is safe for concurrent use.
type Collector struct {
	o        Options
	mu       sync.Mutex
	haveDays map[string]bool
	routed   bool // COPY into the parent table even for one-day batches (benchmarks compare)

	events  prometheus.Counter
	batches *prometheus.CounterVec
}

var _ audit.CollectorServer = (*Collector)(nil)

// New returns a Collector.
func New(o Options) (*Collector, error) {
	if o.Pool == nil {
		return nil, errors.New("audit collector: no database pool")
	}
	if o.PartitionsAhead <= 0 {
		o.PartitionsAhead = 3
	}
	if o.Clock == nil {
		o.Clock = clockwork.NewRealClock()
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Collector{o: o, haveDays: map[string]bool{},
		events:  prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_audit_collector_events_total", Help: "Audit events received in committed batches (re-sent events included; the table keeps one copy)."}),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "writ_audit_collector_batches_total", Help: "Audit batches by outcome."}, []string{"outcome"}),
	}
	if o.Registerer != nil {
		if err := o.Registerer.Register(c.events); err != nil {
			return nil, err
		}
		if err := o.Registerer.Register(c.batches); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Ship receives one batch from a shipper authenticated by its SVID.
func (c *Collector) Ship(ctx context.Context, req *wrapperspb.BytesValue) (*wrapperspb.UInt64Value, error) {
	caller, err := peerID(ctx)
	if err != nil {
		c.batches.WithLabelValues("unauthenticated").Inc()
		return nil, err
	}
	evs, err := audit.DecodeBatch(req.GetValue())
	if err != nil {
		c.batches.WithLabelValues("invalid").Inc()
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if len(evs) == 0 {
		c.batches.WithLabelValues("invalid").Inc()
		return nil, status.Error(codes.InvalidArgument, "empty batch")
	}
	latest := c.o.Clock.Now().Add(MaxClockSkew)
	for i, ev := range evs {
		// A recorder's chains are named by its SPIFFE ID, or ID#instance
		// when replicas share the ID (audit.OpenRecorder); one batch is
		// one chain.
		if audit.SourceOf(ev.Source) != caller || ev.Source != evs[0].Source {
			c.batches.WithLabelValues("forbidden").Inc()
			c.o.Logger.Warn("audit collector: refused events recorded by another source", "caller", caller, "source", ev.Source)
			return nil, status.Errorf(codes.PermissionDenied, "event %s has source %s; the caller is %s", ev.ID, ev.Source, caller)
		}
		if ev.Time.After(latest) {
			c.batches.WithLabelValues("invalid").Inc()
			return nil, status.Errorf(codes.InvalidArgument, "event %s is dated %s, in the future", ev.ID, ev.Time.Format(time.RFC3339))
		}
		if i > 0 && ev.Seq != evs[i-1].Seq+1 {
			c.batches.WithLabelValues("invalid").Inc()
			return nil, status.Errorf(codes.InvalidArgument, "batch is not contiguous at seq %d", ev.Seq)
		}
	}
	if err := c.Insert(ctx, evs); err != nil {
		c.batches.WithLabelValues("error").Inc()
		c.o.Logger.Warn("audit collector: insert failed", "source", caller, "events", len(evs), "err", err)
		return nil, status.Error(codes.Unavailable, "audit insert failed; retry")
	}
	c.batches.WithLabelValues("ok").Inc()
	c.events.Add(float64(len(evs)))
	return wrapperspb.UInt64(evs[len(evs)-1].Seq), nil
}

// peerID is the SPIFFE ID of the caller's verified client certificate.
func peerID(ctx context.Context) (string, error) {
	id, err := svidpeer.FromGRPC(ctx, "no verified client certificate: the shipper must present its SVID")
	if err != nil {
		return "", err
	}
	return id.String(), nil
}

// Columns of audit_events that an event fills, in COPY order.
var columns = []string{"id", "time", "kind", "source", "seq", "prev_hash", "hash", "principal", "destination",
	"action", "resource", "result", "status", "reason", "cause", "policy_revision", "trace_id", "attributes"}

const insertSQL = `INSERT INTO audit_events (id, time, kind, source, seq, prev_hash, hash, principal, destination,
	action, resource, result, status, reason, cause, policy_revision, trace_id, attributes)
SELECT id, time, kind, source, seq, prev_hash, hash, principal, destination,
	action, resource, result, status, reason, cause, policy_revision, trace_id, attributes
FROM audit_staging ON CONFLICT DO NOTHING`

// Insert writes evs in one transaction: COPY into a session-local staging
// table, then INSERT … ON CONFLICT DO NOTHING into audit_events, so a
// re-sent event (same id and time) is kept once. When Insert returns nil
// every event is committed.
func (c *Collector) Insert(ctx context.Context, evs []audit.Event) error {
	days := map[string]time.Time{}
	for _, ev := range evs {
		d := ev.Time.UTC().Truncate(24 * time.Hour)
		days[d.Format("20060102")] = d
	}
	for _, d := range days {
		if err := c.EnsurePartition(ctx, d); err != nil {
			return err
		}
	}
	heads := map[string]audit.Event{}
	firsts := map[string]uint64{}
	for _, ev := range evs {
		if h, ok := heads[ev.Source]; !ok || ev.Seq > h.Seq {
			heads[ev.Source] = ev
		}
		if f, ok := firsts[ev.Source]; !ok || ev.Seq < f {
			firsts[ev.Source] = ev.Seq
		}
	}
	rows := func() pgx.CopyFromSource {
		i := 0
		// pgx encodes a row before asking for the next, so one slice
		// serves them all.
		row := make([]any, len(columns))
		return pgx.CopyFromFunc(func() ([]any, error) {
			if i == len(evs) {
				return nil, nil
			}
			e := &evs[i]
			i++
			attrs := e.Attributes
			if len(attrs) == 0 {
				attrs = []byte("{}")
			}
			// The id as pgtype.UUID: a uuid.UUID is a driver.Valuer,
			// which pgx would turn into its text form and parse back,
			// the largest single cost of encoding a row.
			row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8] = pgtype.UUID{Bytes: e.ID, Valid: true}, e.Time, e.Kind, e.Source, int64(e.Seq), e.PrevHash[:], e.Hash[:], e.Principal, e.Destination
			row[9], row[10], row[11], row[12], row[13], row[14], row[15], row[16], row[17] = e.Action, e.Resource, e.Result, int32(e.Status), e.Reason, e.Cause, e.PolicyRevision, e.TraceID, string(attrs)
			return row, nil
		})
	}
	return pgx.BeginFunc(ctx, c.o.Pool, func(tx pgx.Tx) error {
		// Fast path: COPY straight into audit_events. A batch holding an
		// event already stored (a re-send after a lost acknowledgement)
		// violates the primary key; then the batch goes through a staging
		// table and INSERT … ON CONFLICT DO NOTHING instead.
		if _, err := tx.Exec(ctx, "SAVEPOINT direct"); err != nil {
			return err
		}
		// A batch of one day (nearly all) goes straight into that day's
		// partition, sparing PostgreSQL the routing of each row.
		target := pgx.Identifier{"audit_events"}
		if len(days) == 1 && !c.routed {
			for _, d := range days {
				target = pgx.Identifier{partitionName(d)}
			}
		}
		_, err := tx.CopyFrom(ctx, target, columns, rows())
		if err != nil {
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "23505" { // unique_violation
				return fmt.Errorf("copy events: %w", err)
			}
			if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT direct"); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `CREATE TEMP TABLE IF NOT EXISTS audit_staging
				(LIKE audit_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS`); err != nil {
				return fmt.Errorf("staging table: %w", err)
			}
			if _, err := tx.CopyFrom(ctx, pgx.Identifier{"audit_staging"}, columns, rows()); err != nil {
				return fmt.Errorf("copy events: %w", err)
			}
			if _, err := tx.Exec(ctx, insertSQL); err != nil {
				return fmt.Errorf("insert events: %w", err)
			}
		}
		for src, h := range heads {
			if _, err := tx.Exec(ctx, `INSERT INTO audit_sources (source, last_seq, last_hash) VALUES ($1, $2, $3)
				ON CONFLICT (source) DO UPDATE SET
					last_hash = CASE WHEN excluded.last_seq > audit_sources.last_seq THEN excluded.last_hash ELSE audit_sources.last_hash END,
					last_seq = GREATEST(audit_sources.last_seq, excluded.last_seq), updated_at = now()`,
				src, int64(h.Seq), h.Hash[:]); err != nil {
				return fmt.Errorf("source head: %w", err)
			}
			if err := notify(ctx, tx, src, firsts[src], h.Seq); err != nil {
				return err
			}
		}
		return nil
	})
}
