package collector_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/writmesh/writ/audit/collector"
)

// TestRetainerRunsOnSchedule runs the retention job on a fake clock: the
// first run drops what is due, nothing happens until the interval passes,
// the next run drops the day that became due, and each run is logged and
// counted. A keep under the minimum is refused before anything runs.
func TestRetainerRunsOnSchedule(t *testing.T) {
	r := startRig(t)
	ctx := context.Background()
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	const day = 24 * time.Hour
	// With keep 95 days the cutoff is 2026-08-19 12:00: the day of
	// 2026-08-18 is wholly before it, 2026-08-19 is not yet.
	for _, d := range []time.Time{now.AddDate(0, 0, -200), now.AddDate(0, 0, -96), now.AddDate(0, 0, -95), now} {
		if err := r.col.EnsurePartition(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := collector.NewRetainer(collector.Retainer{Pool: r.env.Pool, Keep: 30 * day}, nil); !errors.Is(err, collector.ErrRetentionTooShort) {
		t.Fatalf("keep 30 days: got %v, want ErrRetentionTooShort", err)
	}
	clk := clockwork.NewFakeClockAt(now)
	var logs bytes.Buffer
	reg := prometheus.NewRegistry()
	ret, err := collector.NewRetainer(collector.Retainer{Pool: r.env.Pool, Keep: 95 * day, Interval: day, Clock: clk,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}, reg)
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- ret.Run(rctx) }()
	defer func() { cancel(); <-done }()

	value := func(name string) float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var v float64
		for _, mf := range mfs {
			if mf.GetName() == name {
				for _, m := range mf.GetMetric() {
					v += m.GetCounter().GetValue()
				}
			}
		}
		return v
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("gave up waiting for %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor("the first run", func() bool { return value("writ_audit_retention_runs_total") == 1 })
	if got := value("writ_audit_retention_partitions_dropped_total"); got != 2 {
		t.Fatalf("first run dropped %v partitions, want 2", got)
	}
	if !strings.Contains(logs.String(), "audit_events_p20260506") || !strings.Contains(logs.String(), "audit_events_p20260818") {
		t.Fatalf("drops not logged:\n%s", logs.String())
	}
	// Half an interval: no run.
	clk.BlockUntilContext(ctx, 1)
	clk.Advance(day / 2)
	if got := value("writ_audit_retention_runs_total"); got != 1 {
		t.Fatalf("runs = %v before the interval passed", got)
	}
	clk.Advance(day / 2)
	waitFor("the second run", func() bool { return value("writ_audit_retention_runs_total") == 2 })
	if got := value("writ_audit_retention_partitions_dropped_total"); got != 3 {
		t.Fatalf("after a day, %v partitions dropped in all, want 3 (2026-08-19 became due)", got)
	}
	var left []string
	rows, err := r.env.Pool.Query(ctx, `SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'audit_events' ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var n string
		_ = rows.Scan(&n)
		left = append(left, n)
	}
	if len(left) == 0 || left[0] != "audit_events_p20261122" {
		t.Fatalf("partitions left: %v, want 2026-11-22 first and nothing older", left)
	}
}
