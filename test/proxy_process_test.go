package test

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/writmesh/writ/internal/syncbuf"
)

// proxyProc is a writ-proxy process (agent and proxy roles).
type proxyProc struct {
	cmd   *exec.Cmd
	out   *syncbuf.Buffer
	admin string
	sock  string // the agent's Workload API address
	done  chan error
}

func startProxyProc(t *testing.T, w *writd, node string, args ...string) *proxyProc {
	t.Helper()
	out, code := w.writ(t, "token", "create", "--spiffe-id", "spiffe://example.org/node/"+node, "--ttl", "5m")
	if code != 0 {
		t.Fatalf("token create: %s", out)
	}
	var tok string
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Token: "); ok {
			tok = v
		}
	}
	bundle := filepath.Join(t.TempDir(), "bundle.json")
	if err := os.WriteFile(bundle, []byte(w.get(t, "/bundle")), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &proxyProc{out: &syncbuf.Buffer{}, admin: freeAddr(t), done: make(chan error, 1)}
	sock, err := os.MkdirTemp("", "writ-proxy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sock) })
	p.sock = "unix://" + filepath.Join(sock, "agent.sock")
	p.cmd = exec.Command(filepath.Join(binDir(t), "writ-proxy"), append([]string{
		"--control-plane", grpcAddr(t, w), "--trust-bundle", bundle, "--trust-domain", "example.org",
		"--workload-api", p.sock, "--admin-addr", p.admin,
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
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + p.admin + "/readyz")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
			err = fmt.Errorf("%d %s", resp.StatusCode, b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("writ-proxy %s not ready: %v\n%s", node, err, p.out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// grpcAddr reads writd's node API address from its config.
func grpcAddr(t *testing.T, w *writd) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(w.dir, "writ.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "grpc: "); ok {
			return v
		}
	}
	t.Fatal("no grpc address in writd's config")
	return ""
}

// TestWritProxyProcesses: writd, and two writ-proxy processes holding
// SVIDs their own agents got from it: frontend's proxy forwards its
// upstream port to orders' proxy over mTLS, which asks the Rego policy of
// --policy-dir and forwards to the app; a plaintext client of the mesh
// port is refused, and SIGTERM stops both cleanly.
func TestWritProxyProcesses(t *testing.T) {
	w := startWritd(t)
	exe := filepath.Join(binDir(t), "writ-proxy")
	uid := fmt.Sprint(os.Geteuid())
	for node, id := range map[string]string{"orders-node": "spiffe://example.org/ns/shop/sa/orders", "frontend-node": "spiffe://example.org/ns/shop/sa/frontend"} {
		if out, code := w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/"+node, "--spiffe-id", id,
			"--selector", "unix:uid:"+uid, "--selector", "unix:path:"+exe); code != 0 {
			t.Fatalf("entry create: %s", out)
		}
	}
	seen := make(chan string, 10)
	slowArrived, release := make(chan struct{}), make(chan struct{})
	app := serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(slowArrived)
			<-release
			io.WriteString(w, "slow done")
			return
		}
		seen <- r.Header.Get("X-Forwarded-Client-Cert")
		io.WriteString(w, "orders here")
	}))
	policyDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(policyDir, "mesh.rego"), []byte(meshPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	mesh := freeAddr(t)
	orders := startProxyProc(t, w, "orders-node", "--inbound", mesh, "--app", app, "--service", "orders", "--policy-dir", policyDir)

	cfgFile := filepath.Join(t.TempDir(), "proxy.yaml")
	cfg := fmt.Sprintf("clusters:\n- name: orders\n  lb_policy: ROUND_ROBIN\n  endpoints:\n  - address: %s\n  peer_ids: [spiffe://example.org/ns/shop/sa/orders]\n", mesh)
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	up := freeAddr(t)
	front := startProxyProc(t, w, "frontend-node", "--proxy-config", cfgFile, "--upstream", "orders="+up)

	resp, err := http.Get("http://" + up + "/items")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "orders here" {
		t.Fatalf("frontend -> orders: %d %q", resp.StatusCode, body)
	}
	if xfcc := <-seen; !strings.HasSuffix(xfcc, ";URI=spiffe://example.org/ns/shop/sa/frontend") {
		t.Fatalf("app saw XFCC %q", xfcc)
	}

	// mTLS is required: plaintext HTTP and a TLS client without an SVID
	// are refused at the handshake.
	if c, err := net.DialTimeout("tcp", mesh, 5*time.Second); err == nil {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
		b, _ := io.ReadAll(c)
		c.Close()
		if strings.Contains(string(b), "orders here") {
			t.Fatal("plaintext request reached the app")
		}
	}
	tc, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", mesh, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err == nil {
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(tc, "GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
		b, _ := io.ReadAll(tc)
		tc.Close()
		if strings.Contains(string(b), "orders here") {
			t.Fatal("a client without an SVID reached the app")
		}
	}

	// One access-log line per request on each side (flushed every
	// 200 ms), with the decision id inbound and the same trace id on both.
	traceOf := func(p *proxyProc, dir string) (trace, decision string) {
		for i := 0; i < 500; i++ {
			for _, line := range strings.Split(p.out.String(), "\n") {
				var e struct {
					Direction, Path string
					TraceID         string `json:"trace_id"`
					DecisionID      string `json:"decision_id"`
				}
				if json.Unmarshal([]byte(line), &e) == nil && e.Direction == dir && e.Path == "/items" {
					return e.TraceID, e.DecisionID
				}
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("no %s access-log line:\n%s", dir, p.out)
		return "", ""
	}
	inTrace, decision := traceOf(orders, "inbound")
	outTrace, _ := traceOf(front, "outbound")
	if inTrace == "" || inTrace != outTrace || decision == "" {
		t.Errorf("access logs: inbound trace %q decision %q, outbound trace %q", inTrace, decision, outTrace)
	}
	// A hundred more requests, then the proxies' resident memory (agent
	// and proxy in one process), for the record.
	c := &http.Client{Transport: &http.Transport{}}
	for range 100 {
		resp, err := c.Get("http://" + up + "/items")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		<-seen
	}
	for name, p := range map[string]*proxyProc{"frontend": front, "orders": orders} {
		fams := scrape(t, "http://"+p.admin+"/metrics")
		if g := fams["process_resident_memory_bytes"].GetMetric(); len(g) == 1 {
			t.Logf("writ-proxy %s: resident memory %.1f MiB", name, g[0].GetGauge().GetValue()/(1<<20))
		} else {
			t.Errorf("writ-proxy %s: no process_resident_memory_bytes on /metrics", name)
		}
	}

	// SIGTERM drains: orders' proxy stops accepting but the request in
	// flight completes.
	slow := make(chan string, 1)
	go func() {
		resp, err := c.Get("http://" + up + "/slow")
		if err != nil {
			slow <- err.Error()
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		slow <- fmt.Sprint(resp.StatusCode, " ", string(b))
	}()
	<-slowArrived
	if err := orders.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		conn, err := net.DialTimeout("tcp", mesh, time.Second)
		if err != nil {
			break
		}
		conn.Close()
		if i > 1000 {
			t.Fatal("orders' mesh port still accepts after SIGTERM")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(release)
	if got := <-slow; got != "200 slow done" {
		t.Fatalf("request in flight across SIGTERM: %s", got)
	}

	if err := front.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*proxyProc{front, orders} {
		select {
		case err := <-p.done:
			p.done <- err
			if err != nil {
				t.Fatalf("writ-proxy exited with %v after SIGTERM:\n%s", err, p.out)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("writ-proxy did not stop within 30 s of SIGTERM")
		}
	}
}
