package collector_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/store/pgtest"
)

// BenchmarkInsert measures Collector.Insert alone (no spool, no gRPC) in
// batches of 5000, reporting rows/s.
//
//	go test -run '^$' -bench Insert -benchtime 100000x ./audit/collector/
func BenchmarkInsert(b *testing.B) {
	pool := pgtest.NewMigrated(b)
	col, err := collector.New(collector.Options{Pool: pool})
	if err != nil {
		b.Fatal(err)
	}
	evs := make([]audit.Event, b.N)
	var prev audit.Hash
	for i := range evs {
		ev, _ := audit.NewEvent(audit.KindRequest, time.Now())
		ev.Source, ev.Seq, ev.PrevHash = "spiffe://example.org/node/bench", uint64(i+1), prev
		ev.Principal, ev.Destination, ev.Action, ev.Result, ev.Status = "spiffe://example.org/ns/a/sa/frontend", "spiffe://example.org/ns/b/sa/orders", "GET", "allow", 200
		ev.Resource = fmt.Sprintf("/api/v1/items/%d", i)
		ev.Attributes = []byte(`{"latency_us":12,"protocol":"HTTP/2"}`)
		ev.Seal()
		prev = ev.Hash
		evs[i] = ev
	}
	ctx := context.Background()
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < len(evs); i += 5000 {
		if err := col.Insert(ctx, evs[i:min(i+5000, len(evs))]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "rows/s")
}
