package test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/regotest"
)

// BenchmarkCheckAudited measures the in-process Check path with a real
// policy, with a sink that records nothing (baseline) and with the spool
// in each durability mode, one request at a time; p50/p99 are reported in
// microseconds, so the added latency of auditing is the difference to the
// baseline.
//
//	go test -run '^$' -bench CheckAudited -benchtime 1000x ./test/
func BenchmarkCheckAudited(b *testing.B) {
	modes := []audit.Durability{"", audit.DurabilityWrite, audit.DurabilityGrouped, audit.DurabilityPerEvent}
	for _, mode := range modes {
		name := string(mode)
		if name == "" {
			name = "no-audit"
		}
		b.Run(name, func(b *testing.B) {
			var sink enforcer.Sink = enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil })
			if mode != "" {
				s, err := audit.OpenSpool(audit.SpoolOptions{Dir: b.TempDir(), Source: "spiffe://example.org/node/bench", Durability: mode})
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				sink = &enforcer.AuditSink{Spool: s}
			}
			e := regotest.Enforcer(b, auditPolicy, sink)
			lat := make([]time.Duration, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				req := auditRequest(i)
				start := time.Now()
				e.Check(context.Background(), req)
				lat[i] = time.Since(start)
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
		})
	}
}
