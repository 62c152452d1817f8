package xds

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
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
	const perConn = 50
	cert := e.pki.leaf(b, "spiffe://example.org/ns/demo/sa/client")
	md, _ := structpb.NewStruct(map[string]any{MetaProxy: "grpc", MetaNamespace: "demo"})
	var conns []*grpc.ClientConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	type ack struct {
		client  int
		version string
		at      time.Time
	}
	acks := make(chan ack, n*4)
	var wg sync.WaitGroup
	sctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); wg.Wait() }()
	names := []string{"greeter.demo:50051"}
	for i := range n {
		if i%perConn == 0 {
			cc, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, RootCAs: e.pki.pool, ServerName: "localhost"})))
			if err != nil {
				b.Fatal(err)
			}
			conns = append(conns, cc)
		}
		stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conns[len(conns)-1]).StreamAggregatedResources(sctx)
		if err != nil {
			b.Fatal(err)
		}
		node := &corev3.Node{Id: fmt.Sprintf("bench-%d", i), Metadata: md}
		if err := stream.Send(&discoverygrpc.DiscoveryRequest{Node: node, TypeUrl: resource.RouteType, ResourceNames: names}); err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				r, err := stream.Recv()
				if err != nil {
					return
				}
				if err := stream.Send(&discoverygrpc.DiscoveryRequest{TypeUrl: resource.RouteType, ResourceNames: names, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}); err != nil {
					return
				}
				select {
				case acks <- ack{client: i, version: r.VersionInfo, at: time.Now()}:
				case <-sctx.Done():
					return
				}
			}
		}()
	}
	// Everyone has the first version.
	initial := map[int]bool{}
	for len(initial) < n {
		initial[(<-acks).client] = true
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	weights := []string{"weight: 50", "weight: 80"}
	var p50s, p99s, maxes []float64
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		y := strings.Replace(strings.Replace(meshYAML, "weight: 80", weights[it%2], 1), "weight: 20", "weight: "+map[string]string{"weight: 50": "50", "weight: 80": "20"}[weights[it%2]], 1)
		start := time.Now()
		if _, err := e.store.Apply(ctx, "bench", mustDecode(b, y), false); err != nil {
			b.Fatal(err)
		}
		got := map[int]time.Duration{}
		timeout := time.After(60 * time.Second)
		for len(got) < n {
			select {
			case a := <-acks:
				if a.at.After(start) {
					got[a.client] = a.at.Sub(start)
				}
			case <-timeout:
				b.Fatalf("only %d of %d clients got the change in 60 s", len(got), n)
			}
		}
		lat := make([]float64, 0, n)
		for _, d := range got {
			lat = append(lat, float64(d.Microseconds())/1000)
		}
		slices.Sort(lat)
		p50s = append(p50s, lat[n/2])
		p99s = append(p99s, lat[min(n-1, n*99/100)])
		maxes = append(maxes, lat[n-1])
	}
	b.StopTimer()
	slices.Sort(p99s)
	b.ReportMetric(float64(n), "clients")
	b.ReportMetric(median(p50s), "p50-ms")
	b.ReportMetric(median(p99s), "p99-ms")
	b.ReportMetric(slices.Max(maxes), "max-ms")
	b.ReportMetric(float64(ms.HeapInuse)/(1<<20), "heap-MiB")
}

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}
