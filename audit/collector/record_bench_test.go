package collector_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/store/pgtest"
)

// BenchmarkRecordTx measures what writd's own events cost the transaction
// they join: 16 events (the rows of one issuance call of 16 CSRs) one
// RecordTx at a time against one RecordManyTx, in turns. It reports
// transactions per second of each.
//
//	go test -run '^$' -bench RecordTx -benchtime 500x ./audit/collector/
func BenchmarkRecordTx(b *testing.B) {
	pool := pgtest.NewMigrated(b)
	col, err := collector.New(collector.Options{Pool: pool})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	events := func() []*audit.Event {
		evs := make([]*audit.Event, 16)
		for i := range evs {
			ev, _ := audit.NewEvent(audit.KindCertIssued, time.Now())
			ev.Principal, ev.Destination, ev.Action, ev.Resource, ev.Result = "spiffe://example.org/node/n1", "spiffe://example.org/ns/a/sa/web", "x509-svid", "5f3a9c", "issued"
			ev.Attributes = []byte(`{"not_after":"2026-11-22T06:00:00Z","entry_id":"0193a4b2-7c1d-7e2f-8a3b-4c5d6e7f8091"}`)
			evs[i] = &ev
		}
		return evs
	}
	var one, many time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		evs := events()
		start := time.Now()
		if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			for _, ev := range evs {
				if err := col.RecordTx(ctx, tx, "spiffe://example.org/writ/control-plane#one", ev); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			b.Fatal(err)
		}
		one += time.Since(start)
		evs = events()
		start = time.Now()
		if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			return col.RecordManyTx(ctx, tx, "spiffe://example.org/writ/control-plane#many", evs)
		}); err != nil {
			b.Fatal(err)
		}
		many += time.Since(start)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/one.Seconds(), "one-by-one-tx/s")
	b.ReportMetric(float64(b.N)/many.Seconds(), "batched-tx/s")
	res, err := collector.Verify(ctx, pool, collector.VerifyOptions{})
	if err != nil || !res.OK() {
		b.Fatalf("verify: %+v %v", res, err)
	}
}
