package xds

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/writmesh/writ/xds/xdstest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"
)

// BenchmarkADSPush connects N simulated proxyless clients (WRIT_BENCH_XDS_N,
// default 100) to the ADS server over mTLS, then per iteration applies a
// route change and measures the time until every client has received and
// ACKed the new version. Reported: p50, p99 and max per-client latency,
// and the process heap (server and clients together) with N connected.
// make bench-xds runs it with N=1000.
func BenchmarkADSPush(b *testing.B) {
	n := 100
	if v, err := strconv.Atoi(os.Getenv("WRIT_BENCH_XDS_N")); err == nil && v > 0 {
		n = v
	}
	e := startADS(b)
	ctx := context.Background()
	if _, err := e.store.Apply(ctx, "bench", mustDecode(b, meshYAML), false); err != nil {
		b.Fatal(err)
	}
	cert := e.pki.leaf(b, "spiffe://example.org/ns/demo/sa/client")
	md, _ := structpb.NewStruct(map[string]any{MetaProxy: "grpc", MetaNamespace: "demo"})
	fleet, err := xdstest.Start(ctx, xdstest.Options{
		N: n,
		Dial: func() (*grpc.ClientConn, error) {
			return grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, RootCAs: e.pki.pool, ServerName: "localhost"})))
		},
		Node:    func(i int) *corev3.Node { return &corev3.Node{Id: fmt.Sprintf("bench-%d", i), Metadata: md} },
		TypeURL: resource.RouteType,
		Names:   []string{"greeter.demo:50051"},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer fleet.Close()
	if err := fleet.WaitFirst(120 * time.Second); err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	weights := []string{"weight: 50", "weight: 80"}
	var sum xdstest.Summary
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		y := strings.Replace(strings.Replace(meshYAML, "weight: 80", weights[it%2], 1), "weight: 20", "weight: "+map[string]string{"weight: 50": "50", "weight: 80": "20"}[weights[it%2]], 1)
		start := time.Now()
		if _, err := e.store.Apply(ctx, "bench", mustDecode(b, y), false); err != nil {
			b.Fatal(err)
		}
		lat, err := fleet.Latencies(start, 60*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		sum.Add(lat)
	}
	b.StopTimer()
	p50, p99, maxMS := sum.Report()
	b.ReportMetric(float64(n), "clients")
	b.ReportMetric(p50, "p50-ms")
	b.ReportMetric(p99, "p99-ms")
	b.ReportMetric(maxMS, "max-ms")
	b.ReportMetric(float64(ms.HeapInuse)/(1<<20), "heap-MiB")
}
