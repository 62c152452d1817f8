package audit_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/writmesh/writ/audit"
)

// lastSeqCollector acknowledges a batch without storing it: it decodes
// only the batch's last event, so that the benchmark's time is the
// shipper's (reading the spool, encoding, gRPC) rather than a collector's.
type lastSeqCollector struct{}

func (lastSeqCollector) Ship(_ context.Context, req *wrapperspb.BytesValue) (*wrapperspb.UInt64Value, error) {
	b := req.GetValue()
	var last []byte
	for len(b) >= 4 {
		n := int(binary.BigEndian.Uint32(b))
		if 4+n > len(b) {
			return nil, errors.New("truncated batch")
		}
		last, b = b[4:4+n], b[4+n:]
	}
	ev, err := audit.Unmarshal(last)
	if err != nil {
		return nil, err
	}
	return wrapperspb.UInt64(ev.Seq), nil
}

// cpuTime is the process's user+system CPU time: on a shared machine a
// steadier measure of work than the wall clock.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkShipper measures the shipper's own cost per event (ns/op,
// cpu-ns/op, B/op, allocs/op are per event; the collector's decoding of
// the request is in them too): b.N events already durable in a spool,
// shipped over a real gRPC connection (loopback TCP, no TLS) to a
// collector that stores nothing, in batches of the size a steady load
// makes (100: 1,000 requests/s, Linger 100 ms; 550: the bench's
// saturation, ~5,500 requests/s) and of a backlog (5000),
// without lingering on the last one.
//
//	go test -run '^$' -bench Shipper -benchmem -benchtime 50000x ./audit/
func BenchmarkShipper(b *testing.B) {
	for _, batch := range []int{100, 550, 5000} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			s, err := audit.OpenSpool(audit.SpoolOptions{Dir: b.TempDir(), Source: "spiffe://example.org/ns/a/sa/bench", Durability: audit.DurabilityGrouped, MaxBytes: 8 << 30})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			ctx := context.Background()
			for i := 0; i < b.N; i++ {
				ev, _ := audit.NewEvent(audit.KindRequest, time.Now())
				ev.Principal, ev.Destination, ev.Action, ev.Result, ev.Status = "spiffe://example.org/ns/a/sa/frontend", "spiffe://example.org/ns/b/sa/orders", "POST", "allow", 200
				ev.Resource = fmt.Sprintf("/api/v1/items/%d", i)
				ev.PolicyRevision = "rev-1"
				ev.Attributes = []byte(`{"headers":{"content-type":"application/octet-stream","user-agent":"fortio.org/fortio-1.66.0","x-request-id":"8d3c6a1e-3f2b-4c55-9a51-2f3e4d5c6b7a"},"host":"orders","latency_us":12,"mtls":true,"protocol":"HTTP/1.1","raw_path":"/api/v1/items?page=2"}`)
				if err := s.Append(ctx, &ev); err != nil {
					b.Fatal(err)
				}
			}
			if err := s.Sync(); err != nil {
				b.Fatal(err)
			}
			srv := grpc.NewServer()
			audit.RegisterCollector(srv, lastSeqCollector{})
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			go func() { _ = srv.Serve(l) }()
			defer srv.Stop()
			conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			sh, err := audit.NewShipper(audit.ShipperOptions{Spool: s, Conn: conn, BatchEvents: batch, Linger: -1})
			if err != nil {
				b.Fatal(err)
			}
			cctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			runtime.GC() // the set-up's garbage, not the shipper's
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime(b)
			go func() { done <- sh.Run(cctx) }()
			for s.Stats().Acked < uint64(b.N) {
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
			cancel()
			<-done
		})
	}
}
