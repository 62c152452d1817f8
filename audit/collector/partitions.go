package collector

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// partitionLockKey serializes partition DDL across writd replicas
// ("writaudp" in ASCII).
const partitionLockKey int64 = 0x7772697461756470

// partitionName is the table holding day d's events.
func partitionName(d time.Time) string { return "audit_events_p" + d.UTC().Format("20060102") }

var partitionRE = regexp.MustCompile(`^audit_events_p(\d{8})$`)

// EnsurePartition creates the partition for the UTC day holding t unless
// it exists.
func (c *Collector) EnsurePartition(ctx context.Context, t time.Time) error {
	day := t.UTC().Truncate(24 * time.Hour)
	name := partitionName(day)
	c.mu.Lock()
	have := c.haveDays[name]
	c.mu.Unlock()
	if have {
		return nil
	}
	err := pgx.BeginFunc(ctx, c.o.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", partitionLockKey); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s PARTITION OF audit_events FOR VALUES FROM ('%s') TO ('%s')`,
			pgx.Identifier{name}.Sanitize(), day.Format(time.RFC3339), day.AddDate(0, 0, 1).Format(time.RFC3339)))
		return err
	})
	if err != nil {
		return fmt.Errorf("create partition %s: %w", name, err)
	}
	c.mu.Lock()
	c.haveDays[name] = true
	c.mu.Unlock()
	return nil
}

// Run keeps partitions created from today to PartitionsAhead days ahead,
// checking hourly, until ctx ends.
func (c *Collector) Run(ctx context.Context) error {
	for {
		now := c.o.Clock.Now()
		for i := 0; i <= c.o.PartitionsAhead; i++ {
			if err := c.EnsurePartition(ctx, now.AddDate(0, 0, i)); err != nil && ctx.Err() == nil {
				c.o.Logger.Warn("audit collector: partition ahead", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-c.o.Clock.After(time.Hour):
		}
	}
}

// DefaultMinRetention is the shortest retention Retain accepts unless
// configured otherwise: PCI DSS 10.5.1 asks for three months immediately
// available.
const DefaultMinRetention = 90 * 24 * time.Hour

// ErrRetentionTooShort is returned for a retention below the minimum.
var ErrRetentionTooShort = errors.New("audit retention shorter than the configured minimum")

// Retain drops the partitions whose whole day ended more than keep before
// now and returns their names. keep below minimum (DefaultMinRetention
// when zero) is refused before anything is dropped. It must run as a role
// that owns the partitions; the collector's role should not.
func Retain(ctx context.Context, pool *pgxpool.Pool, now time.Time, keep, minimum time.Duration) ([]string, error) {
	if minimum <= 0 {
		minimum = DefaultMinRetention
	}
	if keep < minimum {
		return nil, fmt.Errorf("%w: %s < %s", ErrRetentionTooShort, keep, minimum)
	}
	cutoff := now.UTC().Add(-keep)
	rows, err := pool.Query(ctx, `SELECT c.relname FROM pg_inherits i
		JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
		WHERE p.relname = 'audit_events' ORDER BY c.relname`)
	if err != nil {
		return nil, fmt.Errorf("list partitions: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list partitions: %w", err)
	}
	var dropped []string
	for _, n := range names {
		m := partitionRE.FindStringSubmatch(n)
		if m == nil {
			continue
		}
		day, err := time.Parse("20060102", m[1])
		if err != nil || day.AddDate(0, 0, 1).After(cutoff) {
			continue
		}
		// Under the partition lock, so that replicas running the job at
		// once and the collector's partition DDL do not collide.
		var gone bool
		err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", partitionLockKey); err != nil {
				return err
			}
			if err := tx.QueryRow(ctx, "SELECT to_regclass($1) IS NULL", n).Scan(&gone); err != nil || gone {
				return err
			}
			_, err := tx.Exec(ctx, "DROP TABLE "+pgx.Identifier{n}.Sanitize())
			return err
		})
		if err != nil {
			return dropped, fmt.Errorf("drop %s: %w", n, err)
		}
		if !gone {
			dropped = append(dropped, n)
		}
	}
	return dropped, nil
}
