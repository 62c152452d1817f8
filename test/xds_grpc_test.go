package test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"

	"github.com/writmesh/writ/authority/agent"
	"github.com/writmesh/writ/store/pgtest"
	writxds "github.com/writmesh/writ/xds"
)

// The proxyless roles run in child processes of the test binary: grpc-go
// reads GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE (needed to verify writd's
// URI-only SVID on the xDS channel) once at start, and each process gets
// its own bootstrap, node id and identity.
const roleEnv = "WRIT_XDS_ROLE"

func init() {
	switch os.Getenv(roleEnv) {
	case "server":
		os.Exit(greeterServerMain())
	case "client":
		os.Exit(greeterClientMain())
	}
}

// versionServer answers with its version and the caller's SPIFFE ID, as
// the TLS layer verified it.
type versionServer struct {
	testgrpc.UnimplementedTestServiceServer
	version string

	mu   sync.Mutex
	seen map[string]bool // flaky request ids already failed once
}

func (s *versionServer) UnaryCall(ctx context.Context, req *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	if id := string(req.GetPayload().GetBody()); strings.HasPrefix(id, "flaky-") {
		// A flaky request fails with UNAVAILABLE the first time this
		// server sees it, for route retries.
		s.mu.Lock()
		first := !s.seen[id]
		s.seen[id] = true
		s.mu.Unlock()
		if first {
			return nil, status.Error(codes.Unavailable, "flaky: first attempt")
		}
	}
	if d := time.Duration(req.GetResponseSize()) * time.Millisecond; d > 0 {
		// A slow answer on request, for route timeouts.
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	caller := ""
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			if id, err := x509svid.IDFromCert(ti.State.PeerCertificates[0]); err == nil {
				caller = id.String()
			}
		}
	}
	return &testgrpc.SimpleResponse{ServerId: s.version, Username: caller}, nil
}

func greeterServerMain() int {
	creds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var once sync.Once
	srv, err := xds.NewGRPCServer(grpc.Creds(creds), xds.ServingModeCallback(func(addr net.Addr, args xds.ServingModeChangeArgs) {
		fmt.Fprintf(os.Stderr, "serving mode %v on %v: %v\n", args.Mode, addr, args.Err)
		if args.Mode == connectivity.ServingModeServing {
			once.Do(func() { fmt.Println("serving") })
		}
	}))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testgrpc.RegisterTestServiceServer(srv, &versionServer{version: os.Getenv("WRIT_XDS_VERSION"), seen: map[string]bool{}})
	lis, err := net.Listen("tcp", os.Getenv("WRIT_XDS_ADDR"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); srv.Stop() }() // parent gone: stop
	if err := srv.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// callResult is one "call N" answer of the client process.
type callResult struct {
	Versions  map[string]int `json:"versions"`
	Errors    int            `json:"errors"`
	LastError string         `json:"last_error,omitempty"`
	Callers   map[string]int `json:"callers"`
}

func greeterClientMain() int {
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cc, err := grpc.NewClient(os.Getenv("WRIT_XDS_TARGET"), grpc.WithTransportCredentials(creds))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cc.Close()
	c := testgrpc.NewTestServiceClient(cc)
	sc := bufio.NewScanner(os.Stdin)
	enc := json.NewEncoder(os.Stdout)
	for sc.Scan() {
		// "call N", "call N slow MS" or "call N flaky"
		f := strings.Fields(sc.Text())
		var slow int
		if len(f) == 4 && f[2] == "slow" {
			slow, _ = strconv.Atoi(f[3])
		}
		flaky := len(f) == 3 && f[2] == "flaky"
		n, err := strconv.Atoi(f[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, "bad command", sc.Text())
			return 1
		}
		res := callResult{Versions: map[string]int{}, Callers: map[string]int{}}
		for i := range n {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			req := &testgrpc.SimpleRequest{ResponseSize: int32(slow)}
			if flaky {
				req.Payload = &testgrpc.Payload{Body: fmt.Appendf(nil, "flaky-%d-%d", time.Now().UnixNano(), i)}
			}
			r, err := c.UnaryCall(ctx, req)
			cancel()
			if err != nil {
				res.Errors++
				res.LastError = err.Error()
				continue
			}
			res.Versions[r.GetServerId()]++
			res.Callers[r.GetUsername()]++
		}
		if err := enc.Encode(res); err != nil {
			return 1
		}
	}
	return 0
}

// meshWritd is a writd replica started on a given database.
type meshWritd struct {
	*writd
	grpc string
	logs *lockedBuffer
}

func (m *meshWritd) logText() string {
	m.logs.mu.Lock()
	defer m.logs.mu.Unlock()
	return m.logs.b.String()
}

func startMeshWritd(t testing.TB, bin, dbURL, kekFile, name string) *meshWritd {
	t.Helper()
	w := &writd{bin: bin, dir: t.TempDir(), http: freeAddr(t), log: &bytes.Buffer{}, done: make(chan error, 1)}
	w.socket = filepath.Join(w.dir, "admin", "admin.sock")
	grpcAddr := freeAddr(t)
	cfg := fmt.Sprintf("trust_domain: example.org\nreplica_id: %s\ndatabase_url: %q\nlisten:\n  http: %s\n  grpc: %s\nadmin:\n  socket: %s\nca:\n  kek_file: %s\n",
		name, dbURL, w.http, grpcAddr, w.socket, kekFile)
	if err := os.WriteFile(filepath.Join(w.dir, "writ.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	w.cmd = exec.Command(filepath.Join(w.bin, "writd"), "serve", "--config", filepath.Join(w.dir, "writ.yaml"))
	logs := &lockedBuffer{b: w.log}
	w.cmd.Stdout, w.cmd.Stderr = logs, logs
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.done <- w.cmd.Wait() }()
	t.Cleanup(func() {
		_ = w.cmd.Process.Kill()
		<-w.done
		if t.Failed() {
			t.Logf("writd %s log:\n%s", name, w.log)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + w.http + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return &meshWritd{writd: w, grpc: grpcAddr, logs: logs}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("writd not ready: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startMeshAgent runs a real node agent attested with token against
// writd's node API and returns its Workload API address.
func startMeshAgent(t testing.TB, writdGRPC, token string, bundleJSON []byte) string {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString("example.org")
	bundle, err := spiffebundle.Parse(td, bundleJSON)
	if err != nil {
		t.Fatal(err)
	}
	ag, err := agent.New(agent.Config{ControlPlane: writdGRPC, JoinToken: token, TrustDomain: td, TrustBundle: bundle, SyncInterval: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "writ-xds-")
	if err != nil {
		t.Fatal(err)
	}
	addr := "unix://" + filepath.Join(sockDir, "agent.sock")
	l, _, err := agent.ListenUnix(addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { _ = ag.Run(ctx); done <- struct{}{} }()
	go func() { _ = ag.Serve(ctx, l); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done; os.RemoveAll(sockDir) })
	return addr
}

// identityFiles holds one workload's SVID as the file_watcher provider
// reads it.
type identityFiles struct{ cert, key, ca, bundleMap string }

// writeSVIDs fetches the SVIDs of ids from the agent's Workload API and
// writes each to its own directory.
func writeSVIDs(t testing.TB, addr, dir string, bundleJSON []byte, ids ...spiffeid.ID) map[spiffeid.ID]identityFiles {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var svids []*x509svid.SVID
	var roots []*x509.Certificate
	for {
		xc, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(addr))
		if err == nil {
			svids = xc.SVIDs
			if b, ok := xc.Bundles.Get(spiffeid.RequireTrustDomainFromString("example.org")); ok {
				roots = b.X509Authorities()
			}
			have := 0
			for _, id := range ids {
				for _, s := range svids {
					if s.ID == id {
						have++
						break
					}
				}
			}
			if have == len(ids) {
				break
			}
		}
		if ctx.Err() != nil {
			t.Fatalf("workload API never served %v: %v", ids, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	var caPEM []byte
	for _, c := range roots {
		caPEM = append(caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	out := map[spiffeid.ID]identityFiles{}
	for _, id := range ids {
		for _, s := range svids {
			if s.ID != id {
				continue
			}
			certPEM, keyPEM, err := s.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			d := filepath.Join(dir, strings.ReplaceAll(strings.TrimPrefix(id.Path(), "/"), "/", "_"))
			if err := os.MkdirAll(d, 0o700); err != nil {
				t.Fatal(err)
			}
			f := identityFiles{cert: filepath.Join(d, "cert.pem"), key: filepath.Join(d, "key.pem"), ca: filepath.Join(d, "ca.pem"), bundleMap: filepath.Join(d, "bundle-map.json")}
			bm, _ := json.Marshal(map[string]any{"trust_domains": map[string]json.RawMessage{"example.org": bundleJSON}})
			for p, b := range map[string][]byte{f.cert: certPEM, f.key: keyPEM, f.ca: caPEM, f.bundleMap: bm} {
				if err := os.WriteFile(p, b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			out[id] = f
		}
	}
	return out
}

// bootstrap writes a grpc-go xDS bootstrap with xds.GRPCBootstrap (what
// writ mesh bootstrap prints).
func bootstrap(t *testing.T, path, writdGRPC, nodeID string, f identityFiles, metadata map[string]any) {
	t.Helper()
	o := writxds.GRPCBootstrapOptions{ServerURI: writdGRPC, NodeID: nodeID, CertFile: f.cert, KeyFile: f.key, CAFile: f.ca, BundleMapFile: f.bundleMap,
		Namespace: metadata["WRIT_NAMESPACE"].(string)}
	if svc, ok := metadata["WRIT_SERVICE"].(string); ok {
		o.Service, o.Address = svc, metadata["WRIT_ADDRESS"].(string)
		for _, p := range metadata["WRIT_PORTS"].([]any) {
			o.Ports = append(o.Ports, p.(int))
		}
		o.Labels = map[string]string{}
		for k, v := range metadata["WRIT_LABELS"].(map[string]any) {
			o.Labels[k] = v.(string)
		}
	}
	data, err := writxds.GRPCBootstrap(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// child is a role process of this test binary.
type child struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Reader
	log   *bytes.Buffer
	lines chan string
}

func startChild(t *testing.T, env ...string) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: exec.Command(exe), log: &bytes.Buffer{}, lines: make(chan string, 16)}
	c.cmd.Env = append(os.Environ(), append(env, "GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true")...)
	c.cmd.Stderr = &lockedBuffer{b: c.log}
	if c.in, err = c.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	t.Cleanup(func() {
		c.in.Close()
		_ = c.cmd.Process.Kill()
		_ = c.cmd.Wait()
		if t.Failed() {
			t.Logf("%v log:\n%s", env, c.log.String())
		}
	})
	return c
}

type lockedBuffer struct {
	mu sync.Mutex
	b  *bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (c *child) line(t *testing.T, timeout time.Duration) string {
	t.Helper()
	select {
	case l, ok := <-c.lines:
		if !ok {
			t.Fatalf("child exited")
		}
		return l
	case <-time.After(timeout):
		t.Fatalf("child said nothing for %v", timeout)
	}
	return ""
}

func (c *child) call(t *testing.T, n int) callResult { t.Helper(); return c.callSlow(t, n, 0) }

// callFlaky makes calls each server fails once with UNAVAILABLE.
func (c *child) callFlaky(t *testing.T, n int) callResult {
	t.Helper()
	if _, err := fmt.Fprintf(c.in, "call %d flaky\n", n); err != nil {
		t.Fatal(err)
	}
	var r callResult
	if err := json.Unmarshal([]byte(c.line(t, time.Duration(n)*6*time.Second+10*time.Second)), &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// callSlow asks the servers to take ms milliseconds for each answer.
func (c *child) callSlow(t *testing.T, n, ms int) callResult {
	t.Helper()
	if _, err := fmt.Fprintf(c.in, "call %d slow %d\n", n, ms); err != nil {
		t.Fatal(err)
	}
	var r callResult
	if err := json.Unmarshal([]byte(c.line(t, time.Duration(n)*6*time.Second+10*time.Second)), &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestProxylessGRPC: a grpc-go client and two grpc-go servers (versions v1
// and v2), all proxyless through google.golang.org/grpc/xds, take their
// configuration from writd's ADS over mTLS with SVIDs from a real agent.
// Calls succeed over mTLS (the server sees the client's SPIFFE ID), an
// 80/20 split shows in 1,000 calls, and a route change applied through a
// second writd replica reaches the client without restarting anything.
func TestProxylessGRPC(t *testing.T) {
	db := pgtest.URL(t)
	dir := t.TempDir()
	kek, err := exec.Command(filepath.Join(binDir(t), "writd"), "gen-kek").Output()
	if err != nil {
		t.Fatal(err)
	}
	kekFile := filepath.Join(dir, "kek")
	if err := os.WriteFile(kekFile, kek, 0o600); err != nil {
		t.Fatal(err)
	}
	a := startMeshWritd(t, binDir(t), db, kekFile, "replica-a")
	b := startMeshWritd(t, binDir(t), db, kekFile, "replica-b")

	// Identities: a node, and entries for the greeter and its client.
	uid := strconv.Itoa(os.Getuid())
	out, code := a.writ(t, "token", "create", "--spiffe-id", "spiffe://example.org/node/n1")
	if code != 0 {
		t.Fatalf("token create: %s", out)
	}
	token := strings.TrimSpace(strings.TrimPrefix(strings.Split(out, "\n")[0], "Token: "))
	greeterID := spiffeid.RequireFromString("spiffe://example.org/ns/demo/sa/greeter")
	clientID := spiffeid.RequireFromString("spiffe://example.org/ns/demo/sa/client")
	intruderID := spiffeid.RequireFromString("spiffe://example.org/ns/demo/sa/intruder")
	for _, id := range []spiffeid.ID{greeterID, clientID, intruderID} {
		if out, code := a.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/n1", "--spiffe-id", id.String(), "--selector", "unix:uid:"+uid); code != 0 {
			t.Fatalf("entry create: %s", out)
		}
	}
	bundleJSON := []byte(a.get(t, "/bundle"))
	addr := startMeshAgent(t, a.grpc, token, bundleJSON)
	files := writeSVIDs(t, addr, dir, bundleJSON, greeterID, clientID, intruderID)

	// The mesh: the greeter with two subsets, an 80/20 split, and an
	// authorization policy allowing the client (expressed as RBAC).
	authz := `apiVersion: writ.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: greeter, namespace: demo}
spec:
  service: greeter
  package: writ.authz
  mode: enforce
  allow:
    - principals: ["spiffe://example.org/ns/demo/sa/client"]
      paths: ["/grpc.testing.TestService/*"]
`
	// A traffic policy grpc-go must accept: least request, circuit
	// breaking, outlier detection (a NACK would show in writ mesh nodes).
	policy := `apiVersion: writ.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: greeter, namespace: demo}
spec:
  service: greeter
  loadBalancer: {policy: least_request}
  connectionPool: {maxRequests: 1000}
  outlierDetection: {consecutive5xx: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
`
	meshFile := filepath.Join(dir, "mesh.yaml")
	if err := os.WriteFile(meshFile, []byte(meshService+"---\n"+meshRoute+"---\n"+authz+"---\n"+policy), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := a.writ(t, "apply", "-f", meshFile); code != 0 {
		t.Fatalf("apply: %s", out)
	}

	for _, v := range []string{"v1", "v2"} {
		srvAddr := freeAddr(t)
		_, port, _ := net.SplitHostPort(srvAddr)
		p, _ := strconv.Atoi(port)
		bs := filepath.Join(dir, "bootstrap-"+v+".json")
		bootstrap(t, bs, a.grpc, "greeter-"+v, files[greeterID], map[string]any{
			"WRIT_PROXY": "grpc", "WRIT_NAMESPACE": "demo", "WRIT_SERVICE": "greeter",
			"WRIT_LABELS": map[string]any{"version": v}, "WRIT_ADDRESS": "127.0.0.1", "WRIT_PORTS": []any{p},
		})
		s := startChild(t, roleEnv+"=server", "GRPC_XDS_BOOTSTRAP="+bs, "WRIT_XDS_ADDR="+srvAddr, "WRIT_XDS_VERSION="+v)
		if got := s.line(t, 60*time.Second); got != "serving" {
			t.Fatalf("server %s: %q", v, got)
		}
	}
	cbs := filepath.Join(dir, "bootstrap-client.json")
	bootstrap(t, cbs, a.grpc, "client-1", files[clientID], map[string]any{"WRIT_PROXY": "grpc", "WRIT_NAMESPACE": "demo"})
	cl := startChild(t, roleEnv+"=client", "GRPC_XDS_BOOTSTRAP="+cbs, "WRIT_XDS_TARGET=xds:///greeter.demo")

	// Wait until both versions are reachable (registrations propagate).
	deadline := time.Now().Add(60 * time.Second)
	for {
		r := cl.call(t, 20)
		if r.Errors == 0 && r.Versions["v1"] > 0 && r.Versions["v2"] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("calls never reached both versions: %+v", r)
		}
		time.Sleep(200 * time.Millisecond)
	}

	r := cl.call(t, 1000)
	if r.Errors != 0 {
		t.Fatalf("%d of 1000 calls failed: %s", r.Errors, r.LastError)
	}
	// Binomial(1000, 0.8): sd ≈ 12.6; five sd either side.
	if v1 := r.Versions["v1"]; v1 < 737 || v1 > 863 || v1+r.Versions["v2"] != 1000 {
		t.Fatalf("80/20 split: got %v", r.Versions)
	}
	if r.Callers[clientID.String()] != 1000 {
		t.Fatalf("servers saw callers %v, want %s on every call (mTLS)", r.Callers, clientID)
	}
	t.Logf("1000 calls: %v", r.Versions)
	if out, code := b.writ(t, "mesh", "endpoints"); code != 0 || !strings.Contains(out, "greeter-v1") || !strings.Contains(out, "version=v2") {
		t.Fatalf("writ mesh endpoints (replica b sees the registry): %d\n%s", code, out)
	}
	if out, code := a.writ(t, "mesh", "nodes", "-o", "json"); code != 0 || !strings.Contains(out, "client-1") || !strings.Contains(out, "spiffe://example.org/ns/demo/sa/client") || strings.Contains(out, "last_error") {
		t.Fatalf("writ mesh nodes (no node may have refused its config): %d\n%s", code, out)
	}

	// Another workload of the mesh, not in the allow list, reaches the
	// servers over mTLS but RBAC refuses every call.
	ibs := filepath.Join(dir, "bootstrap-intruder.json")
	bootstrap(t, ibs, a.grpc, "intruder-1", files[intruderID], map[string]any{"WRIT_PROXY": "grpc", "WRIT_NAMESPACE": "demo"})
	in := startChild(t, roleEnv+"=client", "GRPC_XDS_BOOTSTRAP="+ibs, "WRIT_XDS_TARGET=xds:///greeter.demo")
	if r := in.call(t, 10); r.Errors != 10 || !strings.Contains(r.LastError, "PermissionDenied") {
		t.Fatalf("a caller outside the allow list: %+v", r)
	}

	// A workload may only register as its own service: the client's
	// identity claiming to serve greeter is refused.
	fbs := filepath.Join(dir, "bootstrap-fake.json")
	bootstrap(t, fbs, a.grpc, "fake-greeter", files[clientID], map[string]any{
		"WRIT_PROXY": "grpc", "WRIT_NAMESPACE": "demo", "WRIT_SERVICE": "greeter",
		"WRIT_LABELS": map[string]any{"version": "v1"}, "WRIT_ADDRESS": "127.0.0.1", "WRIT_PORTS": []any{1},
	})
	fake := startChild(t, roleEnv+"=server", "GRPC_XDS_BOOTSTRAP="+fbs, "WRIT_XDS_ADDR="+freeAddr(t), "WRIT_XDS_VERSION=fake")
	deadline = time.Now().Add(30 * time.Second)
	for !strings.Contains(a.logText(), "may only serve") {
		if time.Now().After(deadline) {
			t.Fatalf("writd did not refuse a node claiming another service")
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = fake

	// A route change through the other replica: everything to v2.
	allV2 := strings.Replace(strings.Replace(meshRoute, "weight: 80", "weight: 0", 1), "weight: 20", "weight: 100", 1)
	if err := os.WriteFile(meshFile, []byte(allV2), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := b.writ(t, "apply", "-f", meshFile); code != 0 || !strings.Contains(out, "updated") {
		t.Fatalf("apply through replica b: %s", out)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		r := cl.call(t, 20)
		if r.Errors == 0 && r.Versions["v2"] == 20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("route change never arrived: %+v", r)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if r := cl.call(t, 200); r.Errors != 0 || r.Versions["v2"] != 200 {
		t.Fatalf("after the route change: %+v", r)
	}

	// Fault injection reaches the client too: abort every call with
	// RESOURCE_EXHAUSTED; then take the fault out again.
	faulty := meshRoute + "      fault:\n        abort: {grpcStatus: 8, percent: 100}\n"
	if err := os.WriteFile(meshFile, []byte(faulty), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := a.writ(t, "apply", "-f", meshFile); code != 0 {
		t.Fatalf("apply fault: %s", out)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		r := cl.call(t, 10)
		if r.Errors == 10 && strings.Contains(r.LastError, "ResourceExhausted") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fault never applied: %+v", r)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// A route timeout reaches the client: answers slower than 300 ms
	// fail with DeadlineExceeded, faster ones pass.
	timed := strings.Replace(meshRoute, "        - {subset: v2, weight: 20}\n", "        - {subset: v2, weight: 20}\n      timeout: 300ms\n", 1)
	if err := os.WriteFile(meshFile, []byte(timed), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := a.writ(t, "apply", "-f", meshFile); code != 0 {
		t.Fatalf("apply timeout: %s", out)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		r := cl.callSlow(t, 2, 1000)
		if r.Errors == 2 && strings.Contains(r.LastError, "DeadlineExceeded") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("route timeout never applied: %+v", r)
		}
	}
	if r := cl.callSlow(t, 5, 10); r.Errors != 0 {
		t.Fatalf("fast calls under the route timeout: %+v", r)
	}
	if out, code := a.writ(t, "rollback", "route", "greeter", "-n", "demo", "--to", "1"); code != 0 {
		t.Fatalf("rollback: %s", out)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		r := cl.call(t, 20)
		if r.Errors == 0 && r.Versions["v1"] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rollback never arrived: %+v", r)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Route retries reach the client: with none, calls that fail once
	// fail; with three retries on UNAVAILABLE they all succeed.
	if r := cl.callFlaky(t, 10); r.Errors != 10 {
		t.Fatalf("flaky calls without retries: %+v", r)
	}
	retried := strings.Replace(meshRoute, "        - {subset: v2, weight: 20}\n", "        - {subset: v2, weight: 20}\n      retries: {attempts: 3, on: [unavailable]}\n", 1)
	if err := os.WriteFile(meshFile, []byte(retried), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := a.writ(t, "apply", "-f", meshFile); code != 0 {
		t.Fatalf("apply retries: %s", out)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		r := cl.callFlaky(t, 20)
		if r.Errors == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("route retries never applied: %+v", r)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Every change is an admin event naming what changed.
	conn, err := pgx.Connect(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM admin_events WHERE path IN ('/v1/mesh/apply', '/v1/mesh/rollback/Route/demo/greeter') AND status = 200 AND detail::text LIKE '%Route/demo/greeter%'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 6 {
		t.Fatalf("%d admin events for route changes, want 6 (apply, apply via b, fault, timeout, rollback, retries)", n)
	}
}
