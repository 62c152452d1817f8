package collector_test

import (
	"context"
	"fmt"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/store/pgtest"
)

// BenchmarkInsert measures Collector.Insert alone (no spool, no gRPC) in
// batches of 5000, reporting rows/s, and what a request event costs in
// storage: its spool record, and its share of the partitions (heap,
// indexes and TOAST) and of the heap alone, with the attributes a
// decision point records for replay (host, raw path with query, the
// default header allowlist).
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
		ev.PolicyRevision = "sha256:3f5c1b0e9d7a"
		ev.TraceID = fmt.Sprintf("4bf92f3577b34da6a3ce929d%08x", i)
		ev.Attributes, _ = audit.CanonicalJSON([]byte(fmt.Sprintf(`{"headers":{"content-type":"application/json","traceparent":"00-4bf92f3577b34da6a3ce929d%08x-00f067aa0ba902b7-01",`+
			`"user-agent":"Go-http-client/2.0","x-request-id":"%s"},"host":"orders.shop.svc","latency_us":12,"protocol":"HTTP/2","raw_path":"/api/v1/items/%d?page=2"}`, i, ev.ID, i)))
		ev.Seal()
		prev = ev.Hash
		evs[i] = ev
	}
	ctx := context.Background()
	runtime.GC()
	b.ReportAllocs()
	b.ResetTimer()
	start, cpu0 := time.Now(), processCPU(b)
	for i := 0; i < len(evs); i += 5000 {
		if err := col.Insert(ctx, evs[i:min(i+5000, len(evs))]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "rows/s")
	// The collector's own share (writd's), apart from PostgreSQL's.
	b.ReportMetric(float64(processCPU(b)-cpu0)/float64(b.N), "go-cpu-ns/row")
	b.StopTimer()
	var total, heap int64
	if err := pool.QueryRow(ctx, `SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0), coalesce(sum(pg_relation_size(c.oid)), 0)
		FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
		WHERE p.relname = 'audit_events'`).Scan(&total, &heap); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(len(evs[0].Marshal())+16), "spool-B/event")
	b.ReportMetric(float64(total)/float64(b.N), "pg-B/event")
	b.ReportMetric(float64(heap)/float64(b.N), "heap-B/event")
}

// processCPU is this process's user+system CPU time.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
