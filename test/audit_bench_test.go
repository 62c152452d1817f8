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
// policy, one request at a time, with a sink that records nothing
// (baseline) and with the spool in each durability mode, reporting p50
// and p99 in microseconds. The baseline and the audited enforcer take
// turns request by request, so both see the same machine (the build
// machine is shared and its load swings); added-p50/added-p99 are the
// differences. The audited sink keeps the default header allowlist, as
// writ-proxy and writ-enforcer do.
//
//	go test -run '^$' -bench CheckAudited -benchtime 5000x ./test/
func BenchmarkCheckAudited(b *testing.B) {
	for _, mode := range []audit.Durability{audit.DurabilityGrouped, audit.DurabilityPerEvent} {
		b.Run(string(mode), func(b *testing.B) {
			s, err := audit.OpenSpool(audit.SpoolOptions{Dir: b.TempDir(), Source: "spiffe://example.org/node/bench", Durability: mode, MaxBytes: 8 << 30})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			red, err := audit.NewRedaction(audit.DefaultAllowedHeaders)
			if err != nil {
				b.Fatal(err)
			}
			base := regotest.Enforcer(b, auditPolicy, enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil }))
			audited := regotest.Enforcer(b, auditPolicy, &enforcer.AuditSink{Spool: s, Redaction: red})
			lb, la := make([]time.Duration, b.N), make([]time.Duration, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				req := auditRequest(i)
				req.Attributes.Request.Http.Headers["user-agent"] = "Go-http-client/2.0"
				req.Attributes.Request.Http.Headers["x-request-id"] = "8f14e45f-ceea-467f-a8f6-1b2c3d4e5f60"
				start := time.Now()
				base.Check(context.Background(), req)
				lb[i] = time.Since(start)
				start = time.Now()
				audited.Check(context.Background(), req)
				la[i] = time.Since(start)
			}
			b.StopTimer()
			slices.Sort(lb)
			slices.Sort(la)
			us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
			p50, p99 := len(lb)/2, len(lb)*99/100
			b.ReportMetric(us(lb[p50]), "base-p50-µs")
			b.ReportMetric(us(lb[p99]), "base-p99-µs")
			b.ReportMetric(us(la[p50]), "p50-µs")
			b.ReportMetric(us(la[p99]), "p99-µs")
			b.ReportMetric(us(la[p50]-lb[p50]), "added-p50-µs")
			b.ReportMetric(us(la[p99]-lb[p99]), "added-p99-µs")
		})
	}
}
