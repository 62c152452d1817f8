package enforcer

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// BenchmarkServerCheck measures the ext_authz server over gRPC with mTLS
// on loopback, 16 concurrent callers per GOMAXPROCS on one connection, as
// Envoy multiplexes checks. Client and server share the machine.
func BenchmarkServerCheck(b *testing.B) {
	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "rbac.rego"), []byte(benchPolicy()), 0o644); err != nil {
		b.Fatal(err)
	}
	ca := newTestCA(b, "cluster.local")
	e := newEnforcer(b, dir, SinkFunc(func(context.Context, Decision) error { return nil }), clockwork.NewRealClock())
	srv := NewServer(e, 0)
	g := grpc.NewServer(append(ServerOptions(), grpc.Creds(credentials.NewTLS(
		tlsconfig.MTLSServerConfig(ca.svid(b, "spiffe://cluster.local/ns/writ/sa/enforcer"), ca.bundle(), tlsconfig.AuthorizeMemberOf(ca.td)))))...)
	srv.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	defer g.Stop()
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(
		tlsconfig.MTLSClientConfig(ca.svid(b, "spiffe://cluster.local/ns/shop/sa/envoy"), ca.bundle(),
			tlsconfig.AuthorizeID(spiffeid.RequireFromString("spiffe://cluster.local/ns/writ/sa/enforcer"))))))
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Close()
	client := authv3.NewAuthorizationClient(cc)
	reqs := benchRequests(1<<14, true)
	ctx := context.Background()
	if _, err := client.Check(ctx, reqs[0]); err != nil {
		b.Fatal(err)
	}
	var next atomic.Int64
	b.SetParallelism(16)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := client.Check(ctx, reqs[next.Add(1)%int64(len(reqs))]); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
}
