package audit

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkSpoolAppend measures Append latency per durability mode with 8
// concurrent appenders (as an enforcer under load has), reporting p50 and
// p99 in microseconds beside ns/op (which is throughput-bound).
//
//	go test -run '^$' -bench SpoolAppend -benchtime 2000x ./audit/
func BenchmarkSpoolAppend(b *testing.B) {
	for _, d := range []Durability{DurabilityGrouped, DurabilityPerEvent} {
		b.Run(string(d), func(b *testing.B) {
			s, err := OpenSpool(SpoolOptions{Dir: b.TempDir(), Source: testSource, Durability: d})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			evs := make([]*Event, b.N)
			for i := range evs {
				evs[i] = testEvent(b, i)
			}
			lat := make([]time.Duration, b.N)
			var next int64
			var mu sync.Mutex
			var wg sync.WaitGroup
			b.ResetTimer()
			for range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						mu.Lock()
						i := next
						next++
						mu.Unlock()
						if i >= int64(b.N) {
							return
						}
						start := time.Now()
						if err := s.Append(context.Background(), evs[i]); err != nil {
							b.Error(err)
							return
						}
						lat[i] = time.Since(start)
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
		})
	}
}
