package compliance_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/compliance"
	"github.com/writmesh/writ/store/pgtest"
)

// BenchmarkReport generates reports over WRIT_BENCH_REPORT_N request
// decisions (default 100,000) spread over 30 days and 50 service pairs,
// one in ten denied, and reports the events covered per second of
// generation, for each export format.
func BenchmarkReport(b *testing.B) {
	n := 100_000
	if v := os.Getenv("WRIT_BENCH_REPORT_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 || n > 5_000_000 {
			b.Fatalf("WRIT_BENCH_REPORT_N: want 1..5000000")
		}
	}
	ctx := context.Background()
	pool := pgtest.NewMigrated(b)
	col, err := collector.New(collector.Options{Pool: pool})
	if err != nil {
		b.Fatal(err)
	}
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	step := 30 * 24 * time.Hour / time.Duration(n)
	var prev audit.Hash
	batch := make([]audit.Event, 0, 10_000)
	for i := range n {
		ev, err := audit.NewEvent(audit.KindRequest, start.Add(time.Duration(i)*step))
		if err != nil {
			b.Fatal(err)
		}
		ev.Principal = fmt.Sprintf("spiffe://example.org/ns/ns%d/sa/svc%d", i%5, i%10)
		ev.Destination = fmt.Sprintf("spiffe://example.org/ns/ns%d/sa/api%d", i%7, i%5)
		ev.Action, ev.Resource, ev.Result, ev.Status = "GET", "/items", "allow", 200
		if i%10 == 0 {
			ev.Result, ev.Status, ev.Reason = "deny", 403, "policy denied"
		}
		ev.Source, ev.Seq, ev.PrevHash = "spiffe://example.org/node/bench", uint64(i+1), prev
		ev.Seal()
		prev = ev.Hash
		if batch = append(batch, ev); len(batch) == cap(batch) || i == n-1 {
			if err := col.Insert(ctx, batch); err != nil {
				b.Fatal(err)
			}
			batch = batch[:0]
		}
	}
	for _, format := range compliance.Formats {
		b.Run(format, func(b *testing.B) {
			spent := map[string]time.Duration{}
			for b.Loop() {
				last, lastAt := "", time.Now()
				progress := func(s string, _, _ int) {
					if last != "" {
						spent[last] += time.Since(lastAt)
					}
					last, lastAt = s, time.Now()
				}
				r, err := compliance.Generate(ctx, pool, compliance.Options{From: start, To: start.Add(31 * 24 * time.Hour), Progress: progress})
				spent[last] += time.Since(lastAt)
				if err != nil {
					b.Fatal(err)
				}
				if r.Sections.Decisions.Total != int64(n) || !r.Sections.Integrity.OK {
					b.Fatalf("report covers %d decisions, integrity %v", r.Sections.Decisions.Total, r.Sections.Integrity.OK)
				}
				if _, err := compliance.Export(r, format); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "events/s")
			for sec, d := range spent {
				b.ReportMetric(d.Seconds()/float64(b.N), sec+"-s/op")
			}
		})
	}
}
