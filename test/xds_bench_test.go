package test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/writmesh/writ/store/pgtest"
)

// BenchmarkWritdADSPush runs the real writd binary and connects N
// simulated ADS clients (WRIT_BENCH_XDS_N, default 100) to it over mTLS
// with an SVID from a real agent. Each iteration applies a route change
// with `writ apply` and measures the time from starting the CLI until
// every client has received and ACKed the new version; writd's resident
// memory is read from /proc with the N clients connected.
func BenchmarkWritdADSPush(b *testing.B) {
	n := 100
	if v, err := strconv.Atoi(os.Getenv("WRIT_BENCH_XDS_N")); err == nil && v > 0 {
		n = v
	}
	bin := os.Getenv("WRIT_BIN_DIR")
	if bin == "" {
		bin = b.TempDir()
		cmd := exec.Command("go", "build", "-o", bin+"/", "./cmd/...")
		_, file, _, _ := runtime.Caller(0)
		cmd.Dir = filepath.Dir(filepath.Dir(file))
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("build: %v\n%s", err, out)
		}
	}
	dir := b.TempDir()
	kek, err := exec.Command(filepath.Join(bin, "writd"), "gen-kek").Output()
	if err != nil {
		b.Fatal(err)
	}
	kekFile := filepath.Join(dir, "kek")
	if err := os.WriteFile(kekFile, kek, 0o600); err != nil {
		b.Fatal(err)
	}
	w := startMeshWritd(b, bin, pgtest.URL(b), kekFile, "bench")
	cli := func(args ...string) string {
		out, err := exec.Command(filepath.Join(bin, "writ"), append([]string{"--admin-socket", w.socket}, args...)...).CombinedOutput()
		if err != nil {
			b.Fatalf("writ %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	out := cli("token", "create", "--spiffe-id", "spiffe://example.org/node/bench")
	token := strings.TrimSpace(strings.TrimPrefix(strings.Split(out, "\n")[0], "Token: "))
	clientID := spiffeid.RequireFromString("spiffe://example.org/ns/demo/sa/client")
	cli("entry", "create", "--parent", "spiffe://example.org/node/bench", "--spiffe-id", clientID.String(), "--selector", "unix:uid:"+strconv.Itoa(os.Getuid()))
	resp, err := httpGet("http://" + w.http + "/bundle")
	if err != nil {
		b.Fatal(err)
	}
	addr := startMeshAgent(b, w.grpc, token, resp)
	files := writeSVIDs(b, addr, dir, resp, clientID)[clientID]
	cert, err := tls.LoadX509KeyPair(files.cert, files.key)
	if err != nil {
		b.Fatal(err)
	}
	caPEM, _ := os.ReadFile(files.ca)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	tlsCfg := &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		// writd's SVID names it by URI only: verify the chain and the ID.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			var certs []*x509.Certificate
			for _, r := range raw {
				c, err := x509.ParseCertificate(r)
				if err != nil {
					return err
				}
				certs = append(certs, c)
			}
			if len(certs) == 0 {
				return errors.New("no server certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter}); err != nil {
				return err
			}
			id, err := x509svid.IDFromCert(certs[0])
			if err != nil || id.String() != "spiffe://example.org/writ/control-plane" {
				return fmt.Errorf("server is %v, not writd's control plane", id)
			}
			return nil
		},
	}
	mesh := filepath.Join(dir, "mesh.yaml")
	writeMesh := func(v1 int) {
		route := strings.Replace(strings.Replace(meshRoute, "weight: 80", fmt.Sprintf("weight: %d", v1), 1), "weight: 20", fmt.Sprintf("weight: %d", 100-v1), 1)
		if err := os.WriteFile(mesh, []byte(meshService+"---\n"+route), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	writeMesh(80)
	cli("apply", "-f", mesh)

	type ack struct {
		client int
		at     time.Time
	}
	acks := make(chan ack, n*4)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var conns []*grpc.ClientConn
	defer func() {
		cancel()
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	}()
	md, _ := structpb.NewStruct(map[string]any{"WRIT_PROXY": "grpc", "WRIT_NAMESPACE": "demo"})
	names := []string{"greeter.demo:50051"}
	for i := range n {
		if i%50 == 0 {
			cc, err := grpc.NewClient(w.grpc, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
			if err != nil {
				b.Fatal(err)
			}
			conns = append(conns, cc)
		}
		stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conns[len(conns)-1]).StreamAggregatedResources(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if err := stream.Send(&discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: fmt.Sprintf("bench-%d", i), Metadata: md}, TypeUrl: resource.RouteType, ResourceNames: names}); err != nil {
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
				case acks <- ack{client: i, at: time.Now()}:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	first := map[int]bool{}
	timeout := time.After(120 * time.Second)
	for len(first) < n {
		select {
		case a := <-acks:
			first[a.client] = true
		case <-timeout:
			b.Fatalf("only %d of %d clients got their first config", len(first), n)
		}
	}
	var p50s, p99s, maxes []float64
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		writeMesh([]int{50, 80}[it%2])
		start := time.Now()
		cli("apply", "-f", mesh)
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
	b.ReportMetric(float64(n), "clients")
	b.ReportMetric(medianOf(p50s), "p50-ms")
	b.ReportMetric(medianOf(p99s), "p99-ms")
	b.ReportMetric(slices.Max(maxes), "max-ms")
	b.ReportMetric(rssMiB(b, w.cmd.Process.Pid), "writd-rss-MiB")
}

func medianOf(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}

// rssMiB reads a process's resident memory from /proc.
func rssMiB(b *testing.B, pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.Atoi(f[1])
			return float64(kb) / 1024
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

func httpGet(url string) ([]byte, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 1<<20))
}
