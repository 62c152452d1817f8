package collector_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/writmesh/writ/audit"
)

// BenchmarkIngest measures end-to-end ingest: b.N events already in a
// spool, shipped over gRPC with mTLS to a collector that COPYs them into
// PostgreSQL, until the last batch is acknowledged (committed). It
// reports events/s.
//
//	go test -run '^$' -bench Ingest -benchtime 200000x ./audit/collector/
func BenchmarkIngest(b *testing.B) {
	for _, c := range []struct{ batch, inflight int }{{5000, 1}, {5000, 2}, {2000, 4}} {
		batch, inflight := c.batch, c.inflight
		b.Run(fmt.Sprintf("batch=%d/inflight=%d", batch, inflight), func(b *testing.B) {
			r := startRigB(b)
			svid := r.env.Attest(b, "bench")
			s, err := audit.OpenSpool(audit.SpoolOptions{Dir: b.TempDir(), Source: svid.ID.String(), Durability: audit.DurabilityGrouped, MaxBytes: 8 << 30})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			ctx := context.Background()
			for i := 0; i < b.N; i++ {
				ev, _ := audit.NewEvent(audit.KindRequest, time.Now())
				ev.Principal, ev.Destination, ev.Action, ev.Result, ev.Status = "spiffe://example.org/ns/a/sa/frontend", "spiffe://example.org/ns/b/sa/orders", "GET", "allow", 200
				ev.Resource = fmt.Sprintf("/api/v1/items/%d", i)
				ev.PolicyRevision = "rev-1"
				ev.Attributes = []byte(`{"latency_us":12,"protocol":"HTTP/2","raw_path":"/api/v1/items"}`)
				if err := s.Append(ctx, &ev); err != nil {
					b.Fatal(err)
				}
			}
			if err := s.Sync(); err != nil {
				b.Fatal(err)
			}
			sh, err := audit.NewShipper(audit.ShipperOptions{Spool: s, Conn: r.dialB(b, svid), BatchEvents: batch, InFlight: inflight})
			if err != nil {
				b.Fatal(err)
			}
			cctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			b.ResetTimer()
			start := time.Now()
			go func() { done <- sh.Run(cctx) }()
			for s.Stats().Acked < uint64(b.N) {
				time.Sleep(time.Millisecond)
			}
			el := time.Since(start)
			b.StopTimer()
			cancel()
			<-done
			b.ReportMetric(float64(b.N)/el.Seconds(), "events/s")
		})
	}
}
