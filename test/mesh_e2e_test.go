package test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/writmesh/writ/internal/syncbuf"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// The mesh end-to-end suite: real writd on PostgreSQL, real writ-proxy
// processes configured only over ADS, and real apps; every traffic
// behaviour is set with `writ apply` of mesh YAML and shown by requests.

// meshE2EPolicy lets frontend call anything; everyone else is denied.
const meshE2EPolicy = `package envoy.authz

default allow := false

allow if input.writ.source.service_account == "frontend"
`

// meshE2E is one test's control plane: writd with a fresh database, the
// bootstrap bundle, and a policy directory for serving sidecars.
type meshE2E struct {
	t         *testing.T
	w         *writd
	bundle    string
	policyDir string
	meshDir   string
	nodes     atomic.Int32
}

func newMeshE2E(t *testing.T, mesh string) *meshE2E {
	t.Helper()
	m := &meshE2E{t: t, w: startWritd(t), policyDir: t.TempDir(), meshDir: t.TempDir()}
	m.bundle = filepath.Join(t.TempDir(), "bundle.json")
	write(t, m.bundle, m.w.get(t, "/bundle"))
	write(t, filepath.Join(m.policyDir, "mesh.rego"), meshE2EPolicy)
	m.apply(mesh)
	return m
}

// apply runs `writ apply -f` on yaml.
func (m *meshE2E) apply(yaml string) {
	m.t.Helper()
	f := filepath.Join(m.meshDir, fmt.Sprintf("mesh-%d.yaml", time.Now().UnixNano()))
	write(m.t, f, yaml)
	if out, code := m.w.writ(m.t, "apply", "-f", f); code != 0 {
		m.t.Fatalf("writ apply: %s", out)
	}
}

// sidecar starts a writ-proxy for a workload of service account sa in
// namespace shop, configured by writd over ADS, and waits until it is
// ready (an SVID and a first configuration).
func (m *meshE2E) sidecar(sa string, args ...string) *proxyProc {
	t := m.t
	t.Helper()
	node := fmt.Sprintf("%s-%d", sa, m.nodes.Add(1))
	exe := filepath.Join(binDir(t), "writ-proxy")
	if out, code := m.w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/"+node, "--spiffe-id", "spiffe://example.org/ns/shop/sa/"+sa,
		"--selector", "unix:uid:"+fmt.Sprint(os.Geteuid()), "--selector", "unix:path:"+exe); code != 0 {
		t.Fatalf("entry create: %s", out)
	}
	out, code := m.w.writ(t, "token", "create", "--spiffe-id", "spiffe://example.org/node/"+node, "--ttl", "5m")
	if code != 0 {
		t.Fatalf("token create: %s", out)
	}
	var tok string
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Token: "); ok {
			tok = v
		}
	}
	sock, err := os.MkdirTemp("", "writ-mesh-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sock) })
	p := &proxyProc{out: &syncbuf.Buffer{}, admin: freeAddr(t), done: make(chan error, 1)}
	p.cmd = exec.Command(exe, append([]string{
		"--control-plane", m.w.grpc, "--trust-bundle", m.bundle, "--trust-domain", "example.org",
		"--workload-api", "unix://" + filepath.Join(sock, "agent.sock"), "--admin-addr", p.admin,
		"--xds-server", m.w.grpc, "--access-log", "",
	}, args...)...)
	p.cmd.Env = append(os.Environ(), "WRIT_JOIN_TOKEN="+tok)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		p.done <- nil
		if t.Failed() {
			t.Logf("writ-proxy %s output:\n%s", node, p.out)
		}
	})
	waitUntil(t, 60*time.Second, "writ-proxy "+node+" ready", func() bool {
		resp, err := http.Get("http://" + p.admin + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

// serve starts an HTTP app and its sidecar serving service sa (labels
// version=version) on a fresh mesh port; the sidecar probes the app
// often so that writd sends the endpoint healthy soon.
func (m *meshE2E) serve(sa, version string, h http.Handler, args ...string) (mesh string, p *proxyProc) {
	m.t.Helper()
	app := serveHTTP(m.t, h)
	mesh = freeAddr(m.t)
	return mesh, m.sidecar(sa, append([]string{"--inbound", mesh, "--app", app, "--version", version,
		"--policy-dir", m.policyDir, "--app-check-interval", "200ms"}, args...)...)
}

// client starts a calling sidecar for sa with a local plaintext port for
// service svc, and returns that port.
func (m *meshE2E) client(sa, svc string) (up string, p *proxyProc) {
	m.t.Helper()
	up = freeAddr(m.t)
	return up, m.sidecar(sa, "--upstream", svc+"="+up)
}

// meshGet is one request through a local port.
type meshResp struct {
	code int
	body string
	hdr  http.Header
}

func meshDo(t *testing.T, c *http.Client, addr, path string, hdr ...string) meshResp {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		return meshResp{body: err.Error()}
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return meshResp{code: resp.StatusCode, body: string(b), hdr: resp.Header}
}

func meshClient() *http.Client {
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
}

// counterValue sums the counter family name's series whose labels
// include want, from the admin port's /metrics parsed with Prometheus's
// own parser.
func counterValue(t *testing.T, p *proxyProc, name string, want map[string]string) float64 {
	t.Helper()
	return sumMatching(scrape(t, "http://"+p.admin+"/metrics")[name], want)
}

func sumMatching(f *dto.MetricFamily, want map[string]string) float64 {
	var n float64
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		n += m.GetCounter().GetValue()
	}
	return n
}

const ordersMesh = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: writ.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  package: envoy.authz
  mode: enforce
`

func ordersRoute(rules string) string {
	return "apiVersion: writ.dev/v1alpha1\nkind: Route\nmetadata: {name: orders, namespace: shop}\nspec:\n  service: orders\n  rules:\n" + rules
}

func ordersPolicy(spec string) string {
	return "apiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: orders, namespace: shop}\nspec:\n  service: orders\n" + spec
}

// waitBoth waits until requests through up have reached both bodies a
// and b: every endpoint is in the client's pool.
func waitBoth(t *testing.T, c *http.Client, up, path, a, b string) {
	t.Helper()
	seen := map[string]bool{}
	waitUntil(t, 45*time.Second, "both "+a+" and "+b+" reachable", func() bool {
		seen[meshDo(t, c, up, path).body] = true
		return seen[a] && seen[b]
	})
}

// binomialOK says whether k successes in n trials are within z standard
// deviations of a probability p: a bound a correct proxy fails about
// once in 10^5 runs at z = 4.5.
func binomialOK(k, n int, p, z float64) bool {
	mean := float64(n) * p
	sd := z * math.Sqrt(float64(n)*p*(1-p))
	return float64(k) >= mean-sd && float64(k) <= mean+sd
}

// TestMeshSplitHeaderRouteMirror: a header route, a weighted split
// (within binomial bounds) and mirroring to a shadow subset whose copies
// arrive while the originals complete without waiting for them.
func TestMeshSplitHeaderRouteMirror(t *testing.T) {
	m := newMeshE2E(t, ordersMesh)
	release := make(chan struct{})
	var shadowMu sync.Mutex
	shadow := map[string]string{} // path -> Host of the copy
	m.serve("orders", "v1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "v1") }))
	m.serve("orders", "v2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.Host, "-shadow") {
			shadowMu.Lock()
			shadow[r.URL.Path] = r.Host
			shadowMu.Unlock()
			// A shadow that never answers must not hold up the original.
			select {
			case <-release:
			case <-r.Context().Done():
			}
			io.WriteString(w, "shadow")
			return
		}
		io.WriteString(w, "v2")
	}))
	up, front := m.client("frontend", "orders")
	c := meshClient()
	waitBoth(t, c, up, "/", "v1", "v2")

	m.apply(ordersRoute(`    - match: {pathPrefix: /, headers: [{name: x-canary, exact: "1"}]}
      destinations: [{subset: v2}]
    - destinations: [{subset: v1, weight: 80}, {subset: v2, weight: 20}]
`))
	// In force once the client's configuration holds it (a request
	// reaching v2 could be the old round robin).
	waitUntil(t, 20*time.Second, "header route in force", func() bool { return strings.Contains(front.dumpRaw(t), "x-canary") })
	for i := range 20 {
		if r := meshDo(t, c, up, "/", "x-canary", "1"); r.code != 200 || r.body != "v2" {
			t.Fatalf("canary request %d: %d %q, want v2", i, r.code, r.body)
		}
	}
	const n = 300
	v2 := 0
	for range n {
		r := meshDo(t, c, up, "/")
		switch {
		case r.code != 200:
			t.Fatalf("split request: %d %q", r.code, r.body)
		case r.body == "v2":
			v2++
		}
	}
	t.Logf("80/20 split: %d of %d to v2", v2, n)
	if !binomialOK(v2, n, 0.2, 4.5) {
		t.Fatalf("80/20 split: %d of %d requests to v2, outside 4.5 sd of 20 %%", v2, n)
	}

	// Mirroring: everything to v1, a copy of each request to v2.
	m.apply(ordersRoute("    - destinations: [{subset: v1}]\n      mirror: {subset: v2, percent: 100}\n"))
	waitUntil(t, 20*time.Second, "mirror in force", func() bool {
		meshDo(t, c, up, "/probe")
		shadowMu.Lock()
		defer shadowMu.Unlock()
		return shadow["/probe"] != ""
	})
	const copies = 10
	for i := range copies {
		// The shadow holds every copy: the originals answer anyway.
		if r := meshDo(t, c, up, fmt.Sprintf("/mirrored/%d", i)); r.code != 200 || r.body != "v1" {
			t.Fatalf("mirrored request %d: %d %q, want v1", i, r.code, r.body)
		}
	}
	close(release)
	waitUntil(t, 20*time.Second, "every copy at the shadow", func() bool {
		shadowMu.Lock()
		defer shadowMu.Unlock()
		for i := range copies {
			if shadow[fmt.Sprintf("/mirrored/%d", i)] == "" {
				return false
			}
		}
		return true
	})
	waitUntil(t, 20*time.Second, "mirrored copies counted", func() bool {
		return counterValue(t, front, "writ_mirrored_requests_total", map[string]string{"result": "200"}) >= copies
	})
}

// TestMeshRetriesTimeoutFaults: an endpoint failing every other request
// is retried and the client sees only successes; a slow endpoint hits the
// route's timeout; a 10 % abort fault answers about 10 % of requests with
// 503 (binomial bounds) and those never reach the app; a delay fault
// delays.
func TestMeshRetriesTimeoutFaults(t *testing.T) {
	m := newMeshE2E(t, ordersMesh)
	var flaky, faulted atomic.Int64
	m.serve("orders", "v1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/flaky":
			if flaky.Add(1)%2 == 1 {
				http.Error(w, "flaky", http.StatusServiceUnavailable)
				return
			}
		case r.URL.Path == "/slow":
			select {
			case <-time.After(10 * time.Second):
			case <-r.Context().Done():
			}
		case r.URL.Path == "/fault":
			faulted.Add(1)
		}
		io.WriteString(w, "ok")
	}))
	up, front := m.client("frontend", "orders")
	c := meshClient()
	waitUntil(t, 45*time.Second, "orders reachable", func() bool { return meshDo(t, c, up, "/").code == 200 })

	m.apply(ordersRoute(`    - match: {pathPrefix: /flaky}
      destinations: [{subset: v1}]
      retries: {attempts: 3, perTryTimeout: 5s, on: [5xx]}
    - match: {pathPrefix: /slow}
      destinations: [{subset: v1}]
      timeout: 300ms
    - match: {pathPrefix: /fault}
      destinations: [{subset: v1}]
      fault: {abort: {httpStatus: 503, percent: 10}}
    - match: {pathPrefix: /delay}
      destinations: [{subset: v1}]
      fault: {delay: {fixed: 400ms, percent: 100}}
    - destinations: [{subset: v1}]
`))
	waitUntil(t, 20*time.Second, "route timeout in force", func() bool {
		r := meshDo(t, c, up, "/slow")
		return r.code == http.StatusGatewayTimeout
	})
	if r := meshDo(t, c, up, "/slow"); r.code != http.StatusGatewayTimeout || !strings.Contains(r.body, "timeout") {
		t.Fatalf("slow request: %d %q, want 504 upstream request timeout", r.code, r.body)
	}

	// Retries.
	retriesBefore := counterValue(t, front, "writ_upstream_retries_total", nil)
	flaky.Store(0)
	const tries = 40
	for i := range tries {
		if r := meshDo(t, c, up, "/flaky"); r.code != 200 || r.body != "ok" {
			t.Fatalf("flaky request %d: %d %q: the retry should have hidden the failure", i, r.code, r.body)
		}
	}
	retried := counterValue(t, front, "writ_upstream_retries_total", nil) - retriesBefore
	t.Logf("%d requests, %d reached the app, %v retries", tries, flaky.Load(), retried)
	if retried < tries/2 || flaky.Load() < tries+tries/2 {
		t.Fatalf("%v retries and %d app hits for %d requests failing every other try", retried, flaky.Load(), tries)
	}

	// Abort fault.
	const n = 500
	aborted := 0
	for range n {
		r := meshDo(t, c, up, "/fault")
		switch {
		case r.code == 503 && strings.Contains(r.body, "fault filter abort"):
			aborted++
		case r.code != 200:
			t.Fatalf("fault request: %d %q", r.code, r.body)
		}
	}
	t.Logf("10 %% abort: %d of %d aborted", aborted, n)
	if !binomialOK(aborted, n, 0.10, 4.5) {
		t.Fatalf("10 %% abort fault: %d of %d requests aborted, outside 4.5 sd", aborted, n)
	}
	if got := faulted.Load(); got != int64(n-aborted) {
		t.Fatalf("the app saw %d fault-route requests, want %d (aborted ones must not reach it)", got, n-aborted)
	}
	if got := counterValue(t, front, "writ_fault_injections_total", map[string]string{"kind": "abort"}); got != float64(aborted) {
		t.Fatalf("writ_fault_injections_total{kind=abort} = %v, want %d", got, aborted)
	}

	// Delay fault: a lower bound only, which load cannot break.
	for i := range 3 {
		start := time.Now()
		r := meshDo(t, c, up, "/delay")
		if took := time.Since(start); r.code != 200 || took < 400*time.Millisecond {
			t.Fatalf("delayed request %d: %d %q after %v, want 200 after at least 400ms", i, r.code, r.body, took)
		}
	}
	if got := counterValue(t, front, "writ_fault_injections_total", map[string]string{"kind": "delay"}); got < 3 {
		t.Fatalf("writ_fault_injections_total{kind=delay} = %v, want >= 3", got)
	}
}

// TestMeshOutlierAndCircuitBreaker: with maxRequests 2, a third request
// in flight overflows with 503 and is counted; with maxConnections 1 and
// maxPendingRequests 1, of six concurrent slow requests two hold a
// connection (one per endpoint: a pool may always have one to each, as
// in Envoy), one waits for one and three are refused at once with 503
// and x-envoy-overloaded, and the waiting one is served when a
// connection frees. With only consecutiveGatewayFailure set, an endpoint
// answering 500 stays in the pool while one answering 502 is ejected
// (the client then sees only the good one) and returns by itself at the
// sweep after its ejection time.
func TestMeshOutlierAndCircuitBreaker(t *testing.T) {
	const outlier = "  outlierDetection: {consecutiveGatewayFailure: 3, interval: 500ms, baseEjectionTime: 2s, maxEjectionPercent: 50}\n"
	m := newMeshE2E(t, ordersMesh+"---\n"+ordersPolicy("  connectionPool: {maxRequests: 2}\n"+outlier))
	var held atomic.Int64
	var release atomic.Pointer[chan struct{}]
	newRelease := func() chan struct{} {
		ch := make(chan struct{})
		release.Store(&ch)
		return ch
	}
	rel := newRelease()
	var v2 atomic.Int64 // v2's answer to /
	v2.Store(http.StatusInternalServerError)
	hold := func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/hold" {
			return false
		}
		held.Add(1)
		select {
		case <-*release.Load():
		case <-r.Context().Done():
		}
		io.WriteString(w, "held")
		return true
	}
	m.serve("orders", "v1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !hold(w, r) {
			io.WriteString(w, "good")
		}
	}))
	m.serve("orders", "v2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch code := int(v2.Load()); {
		case hold(w, r):
		case code != http.StatusOK:
			http.Error(w, "bad", code)
		default:
			io.WriteString(w, "recovered")
		}
	}))
	up, front := m.client("frontend", "orders")
	c := meshClient()
	seen := map[int]bool{}
	waitUntil(t, 45*time.Second, "both endpoints reachable", func() bool {
		seen[meshDo(t, c, up, "/").code] = true
		return seen[200] && seen[500]
	})

	// Circuit breaking: max requests.
	results := make(chan meshResp, 8)
	for range 2 {
		go func() { results <- meshDo(t, c, up, "/hold") }()
	}
	waitUntil(t, 20*time.Second, "two requests held", func() bool { return held.Load() == 2 })
	r := meshDo(t, c, up, "/")
	if r.code != http.StatusServiceUnavailable || r.hdr.Get("X-Envoy-Overloaded") != "true" || r.hdr.Get("X-Writ-Overloaded") != "true" {
		t.Fatalf("third request with two in flight: %d %q %v, want a 503 overflow", r.code, r.body, r.hdr)
	}
	if got := counterValue(t, front, "writ_upstream_overflow_total", map[string]string{"breaker": "max_requests"}); got < 1 {
		t.Fatalf("writ_upstream_overflow_total{breaker=max_requests} = %v after an overflow", got)
	}
	close(rel)
	for range 2 {
		if r := <-results; r.code != 200 || r.body != "held" {
			t.Fatalf("held request: %d %q", r.code, r.body)
		}
	}

	// Circuit breaking: max connections and max pending requests.
	m.apply(ordersPolicy("  connectionPool: {maxConnections: 1, maxPendingRequests: 1}\n" + outlier))
	waitUntil(t, 20*time.Second, "connection limits in force", func() bool {
		return strings.Contains(front.dumpRaw(t), `"max_pending_requests": 1`)
	})
	rel = newRelease()
	held.Store(0)
	const n = 6
	for range n {
		go func() { results <- meshDo(t, c, up, "/hold") }()
	}
	refused := 0
	waitUntil(t, 20*time.Second, "two requests held and three refused", func() bool {
		for {
			select {
			case r := <-results:
				if r.code != http.StatusServiceUnavailable || r.hdr.Get("X-Envoy-Overloaded") != "true" {
					t.Fatalf("request beyond max connections and max pending: %d %q %v, want 503 with x-envoy-overloaded", r.code, r.body, r.hdr)
				}
				refused++
			default:
				return held.Load() == 2 && refused == 3
			}
		}
	})
	if got := counterValue(t, front, "writ_upstream_overflow_total", map[string]string{"breaker": "max_pending_requests"}); got != 3 {
		t.Fatalf("writ_upstream_overflow_total{breaker=max_pending_requests} = %v, want 3", got)
	}
	// The waiting request and the three refused found no connection.
	if got := counterValue(t, front, "writ_upstream_connection_overflow_total", nil); got != 4 {
		t.Fatalf("writ_upstream_connection_overflow_total = %v, want 4", got)
	}
	close(rel)
	for range 3 {
		if r := <-results; r.code != 200 || r.body != "held" {
			t.Fatalf("held or waiting request: %d %q", r.code, r.body)
		}
	}
	if got := held.Load(); got != 3 {
		t.Fatalf("%d requests reached the apps, want 3 (two held, then the one that waited)", got)
	}

	// Outlier detection on gateway failures only: 500s are not ones.
	bad := 0
	for range 20 {
		if r := meshDo(t, c, up, "/"); r.code == http.StatusInternalServerError {
			bad++
		}
	}
	if bad < 9 {
		t.Fatalf("answering 500, v2 got %d of 20 requests, want about 10: it must stay in the pool", bad)
	}
	if got := counterValue(t, front, "writ_upstream_ejections_total", nil); got != 0 {
		t.Fatalf("writ_upstream_ejections_total = %v with only 500s", got)
	}
	// 502s are: keep calling until 10 answers in a row come from the good
	// endpoint; then the bad one is ejected.
	v2.Store(http.StatusBadGateway)
	streak := 0
	waitUntil(t, 20*time.Second, "the failing endpoint ejected", func() bool {
		if r := meshDo(t, c, up, "/"); r.code == 200 && r.body == "good" {
			streak++
		} else {
			streak = 0
		}
		return streak >= 10
	})
	if got := counterValue(t, front, "writ_upstream_ejections_total", nil); got < 1 {
		t.Fatalf("writ_upstream_ejections_total = %v after an ejection", got)
	}
	v2.Store(http.StatusOK)
	waitUntil(t, 25*time.Second, "the ejected endpoint back after its ejection time", func() bool {
		return meshDo(t, c, up, "/").body == "recovered"
	})
}

// TestMeshLoadBalancers: least request sends nothing more to an endpoint
// holding a request while the other is idle; ring hash sends the same
// header value to the same endpoint every time.
func TestMeshLoadBalancers(t *testing.T) {
	m := newMeshE2E(t, ordersMesh+"---\n"+ordersPolicy("  loadBalancer: {policy: least_request}\n"))
	var heldA atomic.Int64
	release := make(chan struct{})
	m.serve("orders", "v1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			heldA.Add(1)
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		io.WriteString(w, "a")
	}))
	m.serve("orders", "v2", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "b") }))
	up, front := m.client("frontend", "orders")
	c := meshClient()
	waitBoth(t, c, up, "/", "a", "b")
	if !strings.Contains(front.dumpRaw(t), "LEAST_REQUEST") {
		t.Fatal("the client's clusters are not LEAST_REQUEST")
	}

	// Requests go out one at a time and stay open until answered; those
	// reaching a are held. Once a holds one, least request (two choices
	// out of two) sends every later one to idle b; round robin would
	// send about 15 of 30 to a.
	results := make(chan meshResp, 40)
	inflight := 0
	for i := range 30 {
		before := heldA.Load()
		go func() { results <- meshDo(t, c, up, "/hold") }()
		inflight++
		waitUntil(t, 20*time.Second, fmt.Sprintf("request %d answered or held", i), func() bool {
			if heldA.Load() > before {
				return true
			}
			select {
			case r := <-results:
				inflight--
				if r.body != "b" {
					t.Fatalf("unheld request answered %d %q", r.code, r.body)
				}
				return true
			default:
				return false
			}
		})
	}
	close(release)
	for ; inflight > 0; inflight-- {
		<-results
	}
	// One more may reach a in a tie: b's previous request can still count
	// as active in the client's sidecar for an instant after its answer
	// reached us (the body is closed after the copy). With two in flight
	// at a, b always wins.
	if got := heldA.Load(); got < 1 || got > 2 {
		t.Fatalf("least request: %d of 30 requests went to the busy endpoint, want 1 (2 after a tie)", got)
	}

	// Ring hash on x-user.
	m.apply(ordersPolicy("  loadBalancer: {policy: ring_hash, hashHeader: x-user}\n"))
	waitUntil(t, 20*time.Second, "ring hash in force", func() bool { return strings.Contains(front.dumpRaw(t), "RING_HASH") })
	got := map[string]bool{}
	for u := range 20 {
		user := fmt.Sprintf("user-%d", u)
		first := meshDo(t, c, up, "/", "x-user", user).body
		for i := range 5 {
			if b := meshDo(t, c, up, "/", "x-user", user).body; b != first {
				t.Fatalf("ring hash: %s went to %q then %q (request %d)", user, first, b, i)
			}
		}
		got[first] = true
	}
	if !got["a"] || !got["b"] {
		t.Fatalf("ring hash: 20 keys all went to %v", got)
	}
}

func (p *proxyProc) dumpRaw(t *testing.T) string {
	t.Helper()
	resp, err := http.Get("http://" + p.admin + "/config_dump")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestMeshGRPCAndTCP: a gRPC service (an h2c app) called by grpc-go
// through the client's outbound port, and an opaque TCP service spliced
// through the pair; a caller the policy does not allow gets an error.
func TestMeshGRPCAndTCP(t *testing.T) {
	grpcPort, tcpPort := portOf(t, freeAddr(t)), portOf(t, freeAddr(t))
	m := newMeshE2E(t, fmt.Sprintf(`apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: greeter, namespace: shop}
spec:
  ports: [{port: %d, protocol: grpc}]
---
apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  ports: [{port: %d, protocol: tcp}]
`, grpcPort, tcpPort))

	// gRPC app: grpc-go's health service on plaintext HTTP/2.
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	fh := &flakyHealth{}
	healthpb.RegisterHealthServer(gs, fh)
	go gs.Serve(gl)
	t.Cleanup(gs.Stop)
	m.sidecar("greeter", "--inbound", freeAddr(t), "--app", gl.Addr().String(), "--policy-dir", m.policyDir, "--app-check-interval", "200ms")

	// TCP app: echoes lines.
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tl.Close() })
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	m.sidecar("echo", "--inbound", freeAddr(t), "--app", tl.Addr().String(), "--policy-dir", m.policyDir, "--app-check-interval", "200ms")

	// frontend binds upstream ports for greeter and echo, and writd's
	// per-port outbound listeners (the TCP one on 127.0.0.1:tcpPort).
	gup, eup := freeAddr(t), freeAddr(t)
	front := m.sidecar("frontend", "--upstream", "greeter="+gup, "--upstream", "echo="+eup, "--outbound-ports")
	sup, _ := m.client("stranger", "greeter")

	call := func(addr string) error {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		if err == nil && resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("status %v", resp.GetStatus())
		}
		return err
	}
	var lastErr error
	waitUntil(t, 45*time.Second, "gRPC through the pair", func() bool { lastErr = call(gup); return lastErr == nil })
	conn, err := grpc.NewClient(gup, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	for i := range 20 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("gRPC call %d: %v %v", i, resp, err)
		}
	}
	err = call(sup)
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("stranger's gRPC call: %v, want PermissionDenied", err)
	}

	// gRPC retries: the server fails every other call with UNAVAILABLE;
	// a route with retries (on unavailable, writd's default for gRPC)
	// hides it.
	fh.flaky.Store(true)
	failed := 0
	for range 10 {
		if status.Code(call(gup)) == codes.Unavailable {
			failed++
		}
	}
	if failed == 0 {
		t.Fatal("the flaky server failed no call without retries")
	}
	m.apply("apiVersion: writ.dev/v1alpha1\nkind: Route\nmetadata: {name: greeter, namespace: shop}\nspec:\n  service: greeter\n  rules:\n    - destinations: [{service: greeter}]\n      retries: {attempts: 3}\n")
	waitUntil(t, 20*time.Second, "gRPC retries in force", func() bool { return strings.Contains(front.dumpRaw(t), `"unavailable"`) })
	retriesBefore := counterValue(t, front, "writ_upstream_retries_total", nil)
	for i := range 20 {
		if err := call(gup); err != nil {
			t.Fatalf("gRPC call %d with retries: %v", i, err)
		}
	}
	if got := counterValue(t, front, "writ_upstream_retries_total", nil) - retriesBefore; got < 10 {
		t.Fatalf("%v retries for 20 calls to a server failing every other one", got)
	}

	// Opaque TCP, through writd's listener and through the upstream port.
	echoOnce := func(addr string) bool {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "hello\n"); err != nil {
			return false
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		return err == nil && line == "hello\n"
	}
	waitUntil(t, 45*time.Second, "TCP echo through the upstream port", func() bool { return echoOnce(eup) })
	var tc net.Conn
	waitUntil(t, 45*time.Second, "TCP echo through the pair", func() bool {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", tcpPort), 5*time.Second)
		if err != nil {
			return false
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "ping\n"); err != nil {
			c.Close()
			return false
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "ping\n" {
			c.Close()
			return false
		}
		tc = c
		return true
	})
	br := bufio.NewReader(tc)
	for i := range 20 {
		msg := fmt.Sprintf("line %d %s\n", i, strings.Repeat("x", 1000))
		if _, err := io.WriteString(tc, msg); err != nil {
			t.Fatal(err)
		}
		if got, err := br.ReadString('\n'); err != nil || got != msg {
			t.Fatalf("TCP echo %d: %q %v", i, got, err)
		}
	}
	// A spliced connection is counted when it ends.
	tc.Close()
	waitUntil(t, 10*time.Second, "TCP bytes counted", func() bool {
		return counterValue(t, front, "writ_tcp_sent_bytes_total", map[string]string{"direction": "outbound"}) >= 20*1000
	})
}

// flakyHealth is gRPC's health service that, once flaky, fails every
// other call with UNAVAILABLE.
type flakyHealth struct {
	healthpb.UnimplementedHealthServer
	flaky atomic.Bool
	n     atomic.Int64
}

func (f *flakyHealth) Check(context.Context, *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if f.flaky.Load() && f.n.Add(1)%2 == 1 {
		return nil, status.Error(codes.Unavailable, "flaky")
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func portOf(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	fmt.Sscan(p, &n)
	return n
}

// TestMeshSecurityAuditMetrics: the mesh port refuses plaintext, a TLS
// client without a certificate, and SVIDs of another trust domain or CA;
// allowed and denied requests are decided by policy and each leaves an
// audit row in writd's trail (`writ audit query`); the sidecars' metrics
// parse with Prometheus's own parser and carry the mesh labels.
func TestMeshSecurityAuditMetrics(t *testing.T) {
	m := newMeshE2E(t, ordersMesh)
	mesh, orders := m.serve("orders", "v1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "orders here") }),
		"--audit-spool-dir", t.TempDir())
	up, front := m.client("frontend", "orders")
	sup, _ := m.client("stranger", "orders")
	c := meshClient()
	waitUntil(t, 45*time.Second, "orders reachable", func() bool { return meshDo(t, c, up, "/").code == 200 })

	stamp := time.Now().UnixNano()
	allowed, denied := fmt.Sprintf("/allowed/%d", stamp), fmt.Sprintf("/denied/%d", stamp)
	if r := meshDo(t, c, up, allowed); r.code != 200 || r.body != "orders here" {
		t.Fatalf("frontend -> orders: %d %q", r.code, r.body)
	}
	if r := meshDo(t, c, sup, denied); r.code != http.StatusForbidden {
		t.Fatalf("stranger -> orders: %d %q, want 403", r.code, r.body)
	}

	// Refused at the handshake: none of these reach the app.
	refused := func(what string, cfg *tls.Config) {
		t.Helper()
		if cfg == nil {
			c, err := net.DialTimeout("tcp", mesh, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
			if b, _ := io.ReadAll(c); strings.Contains(string(b), "orders here") {
				t.Fatalf("%s reached the app", what)
			}
			return
		}
		cfg.InsecureSkipVerify = true
		cfg.NextProtos = []string{"http/1.1"}
		tc, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", mesh, cfg)
		if err != nil {
			return
		}
		defer tc.Close()
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(tc, "GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
		if b, _ := io.ReadAll(tc); strings.Contains(string(b), "orders here") {
			t.Fatalf("%s reached the app", what)
		}
	}
	handshakesBefore := counterValue(t, orders, "writ_tls_handshake_errors_total", map[string]string{"direction": "inbound"})
	refused("plaintext HTTP", nil)
	refused("a TLS client without a certificate", &tls.Config{})
	refused("an SVID of trust domain other.org", &tls.Config{Certificates: []tls.Certificate{foreignSVID(t, "spiffe://other.org/ns/shop/sa/frontend")}})
	refused("an example.org SVID from a foreign CA", &tls.Config{Certificates: []tls.Certificate{foreignSVID(t, "spiffe://example.org/ns/shop/sa/frontend")}})
	waitUntil(t, 10*time.Second, "refused handshakes counted", func() bool {
		return counterValue(t, orders, "writ_tls_handshake_errors_total", map[string]string{"direction": "inbound"})-handshakesBefore >= 3
	})

	// Audit rows for both decisions, through the CLI.
	find := func(path, result, source string) bool {
		out, code := m.w.writ(t, "audit", "query", "--kind", "request", "--result", result, "--format", "json", "--limit", "1000")
		if code != 0 {
			t.Fatalf("audit query: %s", out)
		}
		var rows []auditRowJSON
		if err := json.Unmarshal([]byte(out), &rows); err != nil {
			t.Fatalf("audit query output: %v\n%s", err, out)
		}
		for _, r := range rows {
			if r.Resource == path && r.Source == source && strings.HasPrefix(r.Recorder, "spiffe://example.org/ns/shop/sa/orders") {
				return true
			}
		}
		return false
	}
	waitUntil(t, 30*time.Second, "allow row in the audit trail", func() bool {
		return find(allowed, "allow", "spiffe://example.org/ns/shop/sa/frontend")
	})
	waitUntil(t, 30*time.Second, "deny row in the audit trail", func() bool {
		return find(denied, "deny", "spiffe://example.org/ns/shop/sa/stranger")
	})

	// Prometheus text from both sidecars' admin ports, parsed by
	// Prometheus's parser (scrape), with the mesh's labels.
	in := scrape(t, "http://"+orders.admin+"/metrics")
	for _, want := range []map[string]string{
		{"direction": "inbound", "source_workload": "frontend", "source_namespace": "shop", "destination_service": "orders", "response_code": "200", "authz_result": "allow"},
		{"direction": "inbound", "source_workload": "stranger", "source_namespace": "shop", "destination_service": "orders", "response_code": "403", "authz_result": "deny"},
	} {
		if sumMatching(in["writ_requests_total"], want) < 1 {
			t.Errorf("orders' writ_requests_total has no series %v", want)
		}
	}
	out := scrape(t, "http://"+front.admin+"/metrics")
	if sumMatching(out["writ_requests_total"], map[string]string{"direction": "outbound", "response_code": "200"}) < 1 {
		t.Error("frontend's writ_requests_total has no outbound 200")
	}
	if h := out["writ_request_duration_seconds"]; h.GetType() != dto.MetricType_HISTOGRAM || len(h.GetMetric()) == 0 || h.GetMetric()[0].GetHistogram().GetSampleCount() == 0 {
		t.Errorf("frontend's writ_request_duration_seconds is not a histogram with samples: %v", h)
	}
}

// auditRowJSON is a row of `writ audit query --format json`.
type auditRowJSON struct {
	Kind     string `json:"kind"`
	Recorder string `json:"recorder"`
	Source   string `json:"source"`
	Resource string `json:"resource"`
	Result   string `json:"result"`
}

// foreignSVID is an X.509 SVID for id issued by a CA the mesh does not
// trust.
func foreignSVID(t *testing.T, id string) tls.Certificate {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "foreign CA"}, NotBefore: time.Now().Add(-time.Minute),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(id)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{u}, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}
}
