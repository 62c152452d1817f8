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
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/writmesh/writ/store/pgtest"
	"github.com/writmesh/writ/xds/xdstest"
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

	md, _ := structpb.NewStruct(map[string]any{"WRIT_PROXY": "grpc", "WRIT_NAMESPACE": "demo"})
	fleet, err := xdstest.Start(context.Background(), xdstest.Options{
		N: n,
		Dial: func() (*grpc.ClientConn, error) {
			return grpc.NewClient(w.grpc, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
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
	var sum xdstest.Summary
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		writeMesh([]int{50, 80}[it%2])
		start := time.Now()
		cli("apply", "-f", mesh)
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
	b.ReportMetric(rssMiB(b, w.cmd.Process.Pid), "writd-rss-MiB")
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
