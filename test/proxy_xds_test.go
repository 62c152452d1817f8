package test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writmesh/writ/internal/syncbuf"
)

// adsProxy is a writ-proxy process configured by writd over ADS only.
type adsProxy struct {
	*proxyProc
}

// startADSProxy starts writ-proxy for node with an agent joined to w and
// the proxy configured by writd (--xds-server), and waits until it is
// ready: an SVID and a first configuration.
func startADSProxy(t *testing.T, w *auditWritd, node string, args ...string) *adsProxy {
	t.Helper()
	p := launchADSProxy(t, w, node, args...)
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

// launchADSProxy starts writ-proxy without waiting for it to be ready.
func launchADSProxy(t *testing.T, w *auditWritd, node string, args ...string) *adsProxy {
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
	bjson, err := w.bundle(t).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(t.TempDir(), "bundle.json")
	if err := os.WriteFile(bundle, bjson, 0o600); err != nil {
		t.Fatal(err)
	}
	sock, err := os.MkdirTemp("", "writ-proxy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sock) })
	p := &proxyProc{out: &syncbuf.Buffer{}, admin: freeAddr(t), done: make(chan error, 1)}
	p.cmd = exec.Command(filepath.Join(binDir(t), "writ-proxy"), append([]string{
		"--control-plane", w.grpc, "--trust-bundle", bundle, "--trust-domain", "example.org",
		"--workload-api", "unix://" + filepath.Join(sock, "agent.sock"), "--admin-addr", p.admin,
		"--xds-server", w.grpc, "--access-log", "",
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
	return &adsProxy{p}
}

// startAppAt serves an HTTP app answering body on addr (retrying while a
// previous server's port frees).
func startAppAt(t *testing.T, addr, body string) *http.Server {
	t.Helper()
	var l net.Listener
	var err error
	for i := 0; i < 100; i++ {
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return srv
}

// dump is the proxy's /config_dump.
type adsDump struct {
	XDS struct {
		Connected bool   `json:"connected"`
		Version   string `json:"version"`
		LastError string `json:"last_error"`
	} `json:"xds"`
	Resources map[string][]json.RawMessage `json:"resources"`
}

func (p *adsProxy) dump(t *testing.T) adsDump {
	t.Helper()
	resp, err := http.Get("http://" + p.admin + "/config_dump")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var d adsDump
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil {
		t.Fatal(err)
	}
	return d
}

const adsMesh = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: writ.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  package: envoy.authz
  mode: enforce
`

func adsRoute(rules string) string {
	return `apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  rules:
` + rules
}

// TestWritProxyOverADS: writd, PostgreSQL, and three writ-proxies (orders
// v1 and v2 serving, frontend calling) configured only over ADS. Requests
// through the pair are allowed and denied by policy; route changes applied
// with `writ apply` reach the running proxies; a route the proxy cannot
// honour is NACKed with its reason while the old configuration stays; two
// enforced AuthorizationPolicies on one service must both allow; a
// sidecar whose app is down gets taken out of its peers' endpoints and
// back; and with writd killed the proxies keep serving, then reconnect.
func TestWritProxyOverADS(t *testing.T) {
	pg := startPG(t)
	w := newAuditWritd(t, pg.url)
	exe := filepath.Join(binDir(t), "writ-proxy")
	w.registerSidecars(t, exe, map[string]string{"orders-v1": "orders", "orders-v2": "orders", "orders-v3": "orders", "frontend": "frontend", "stranger": "stranger"})
	meshDir := t.TempDir()
	apply := func(name, yaml string) string {
		t.Helper()
		f := filepath.Join(meshDir, name)
		write(t, f, yaml)
		out, code := w.writ(t, "apply", "-f", f)
		if code != 0 {
			t.Fatalf("apply %s: %s", name, out)
		}
		return out
	}
	apply("mesh.yaml", adsMesh)
	apply("route.yaml", adsRoute("    - destinations: [{subset: v1}]\n"))

	policyDir := t.TempDir()
	write(t, filepath.Join(policyDir, "mesh.rego"), meshPolicy)
	app := func(version string) string {
		return serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, version)
		}))
	}
	v1 := startADSProxy(t, w, "orders-v1", "--inbound", freeAddr(t), "--app", app("v1"), "--version", "v1", "--policy-dir", policyDir)
	v2addr := freeAddr(t)
	v2app := startAppAt(t, v2addr, "v2")
	startADSProxy(t, w, "orders-v2", "--inbound", freeAddr(t), "--app", v2addr, "--version", "v2", "--policy-dir", policyDir, "--app-check-interval", "100ms")
	up, httpProxy := freeAddr(t), freeAddr(t)
	front := startADSProxy(t, w, "frontend", "--upstream", "orders="+up, "--http-proxy", httpProxy)
	strangerUp := freeAddr(t)
	startADSProxy(t, w, "stranger", "--upstream", "orders="+strangerUp)

	// A sidecar whose first configuration cannot be applied (its mesh
	// port is taken) NACKs it and is not ready, saying why.
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	v3 := launchADSProxy(t, w, "orders-v3", "--inbound", taken.Addr().String(), "--app", app("v3"), "--version", "v3", "--policy-dir", policyDir)
	waitUntil(t, 60*time.Second, "orders-v3 NACKs its first configuration", func() bool {
		resp, err := http.Get("http://" + v3.admin + "/readyz")
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable && strings.Contains(string(b), "address already in use")
	})

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	get := func(addr string, hdr ...string) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+addr+"/items", nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}

	// Allowed: frontend -> orders, through the upstream port and through
	// the HTTP proxy port by name, once orders' sidecars have taken their
	// configuration (writd sends them to clients only then).
	waitUntil(t, 30*time.Second, "frontend reaches orders v1", func() bool {
		code, body := get(up)
		return code == 200 && body == "v1"
	})
	proxyClient := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: httpProxy})}}
	resp, err := proxyClient.Get("http://orders.shop/items")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "v1" {
		t.Fatalf("through the HTTP proxy port: %d %q", resp.StatusCode, body)
	}
	// Denied: the policy lets only frontend call orders.
	if code, body := get(strangerUp); code != http.StatusForbidden {
		t.Fatalf("stranger -> orders: %d %q, want 403", code, body)
	}

	// A header route and a split, applied through writd, reach the running
	// proxy without a restart.
	applied := time.Now()
	apply("route.yaml", adsRoute("    - match: {pathPrefix: /, headers: [{name: x-canary, exact: \"1\"}]}\n      destinations: [{subset: v2}]\n    - destinations: [{subset: v1}]\n"))
	waitUntil(t, 20*time.Second, "header route to v2", func() bool {
		_, body := get(up, "x-canary", "1")
		return body == "v2"
	})
	t.Logf("a route change took %v from writ apply to requests through the running proxy", time.Since(applied).Round(time.Millisecond))
	if _, body := get(up); body != "v1" {
		t.Fatalf("without the header: %q, want v1", body)
	}
	apply("route.yaml", adsRoute("    - destinations: [{subset: v1, weight: 50}, {subset: v2, weight: 50}]\n"))
	seen := map[string]int{}
	waitUntil(t, 20*time.Second, "50/50 split", func() bool {
		_, body := get(up)
		seen[body]++
		return seen["v1"] >= 3 && seen["v2"] >= 3
	})
	goodVersion := v1.dump(t).XDS.Version

	// A binding the sidecar cannot honour (an AuthorizationPolicy whose
	// Rego rule orders' policy does not define: only the sidecar can know
	// that; what the config alone shows, writ apply refuses) is NACKed
	// with the reason; writd shows it, and the configuration in force
	// stays.
	apply("authz.yaml", "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: orders-nope, namespace: shop}\nspec:\n  service: orders\n  package: writ.nope\n  mode: enforce\n")
	const nackReason = "nothing defines decision path data.writ.nope.allow"
	waitUntil(t, 20*time.Second, "NACK reported", func() bool {
		return strings.Contains(v1.dump(t).XDS.LastError, nackReason)
	})
	if d := v1.dump(t); d.XDS.Version != goodVersion {
		t.Fatalf("version in force after the NACK: %s, want %s", d.XDS.Version, goodVersion)
	}
	if out, code := w.writ(t, "mesh", "nodes"); code != 0 || !strings.Contains(out, "nothing defines decision path") {
		t.Errorf("writ mesh nodes does not show the NACK (%d):\n%s", code, out)
	}
	clear(seen)
	for range 40 {
		_, body := get(up)
		seen[body]++
	}
	if seen["v1"] == 0 || seen["v2"] == 0 || seen["v1"]+seen["v2"] != 40 {
		t.Fatalf("after the NACK the split should stay: %v", seen)
	}
	if out, code := w.writ(t, "delete", "authorizationpolicy", "orders-nope", "-n", "shop"); code != 0 {
		t.Fatalf("delete authorization policy: %s", out)
	}

	// Two enforced AuthorizationPolicies on orders: the sidecars decide by
	// both rules, and a request passes only if each allows (the mesh
	// policy allows frontend any method; writ.methods only GET).
	write(t, filepath.Join(policyDir, "methods.rego"), "package writ.methods\n\ndefault allow := false\n\nallow if input.attributes.request.http.method == \"GET\"\n")
	authz := func(name, pkg string) string {
		return "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: " + name + ", namespace: shop}\nspec:\n  service: orders\n  package: " + pkg + "\n  mode: enforce\n"
	}
	post := func() int {
		resp, err := client.Post("http://"+up+"/items", "text/plain", strings.NewReader("x"))
		if err != nil {
			return 0
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := post(); code != 200 {
		t.Fatalf("POST before the policies: %d, want 200", code)
	}
	apply("authz.yaml", authz("orders-mesh", "envoy.authz")+"---\n"+authz("orders-methods", "writ.methods"))
	waitUntil(t, 20*time.Second, "POST denied by the second policy", func() bool { return post() == http.StatusForbidden })
	if code, body := get(up); code != 200 {
		t.Fatalf("GET with both policies: %d %q, want 200", code, body)
	}
	if code, _ := get(strangerUp); code != http.StatusForbidden {
		t.Fatalf("stranger with both policies: %d, want 403", code)
	}
	// Both sidecars (the split sends to v1 and v2) decide by both.
	waitUntil(t, 20*time.Second, "every POST denied", func() bool {
		for range 10 {
			if post() != http.StatusForbidden {
				return false
			}
		}
		return true
	})
	for _, name := range []string{"orders-mesh", "orders-methods"} {
		if out, code := w.writ(t, "delete", "authorizationpolicy", name, "-n", "shop"); code != 0 {
			t.Fatalf("delete authorization policy: %s", out)
		}
	}
	waitUntil(t, 20*time.Second, "POST allowed again", func() bool { return post() == 200 })

	// Health comes from the data planes: with the route gone, requests
	// go round robin to both versions; orders v2's sidecar finds its app
	// down and writd takes v2 out of frontend's endpoints, then puts it
	// back when the app returns.
	if out, code := w.writ(t, "delete", "route", "orders", "-n", "shop"); code != 0 {
		t.Fatalf("delete route: %s", out)
	}
	clear(seen)
	waitUntil(t, 20*time.Second, "both versions without a route", func() bool {
		_, body := get(up)
		seen[body]++
		return seen["v1"] > 0 && seen["v2"] > 0
	})
	v2app.Close()
	waitUntil(t, 30*time.Second, "v2 out of the pool", func() bool {
		for range 6 {
			if code, body := get(up); code != 200 || body != "v1" {
				return false
			}
		}
		return true
	})
	v2app = startAppAt(t, v2addr, "v2")
	waitUntil(t, 30*time.Second, "v2 back in the pool", func() bool {
		_, body := get(up)
		return body == "v2"
	})

	// writd killed: the proxies keep serving the configuration in force.
	w.kill9(t)
	waitUntil(t, 20*time.Second, "frontend sees writd gone", func() bool { return !front.dump(t).XDS.Connected })
	for range 10 {
		if code, body := get(up); code != 200 || (body != "v1" && body != "v2") {
			t.Fatalf("with writd down: %d %q", code, body)
		}
	}
	if v1.dump(t).XDS.Version == "" {
		t.Fatal("orders lost its configuration with writd")
	}
	// Back: the proxies reconnect and take the next change.
	restarted := time.Now()
	w.start(t)
	waitUntil(t, 60*time.Second, "frontend reconnected", func() bool { return front.dump(t).XDS.Connected })
	t.Logf("frontend reconnected %v after writd started again (ready included)", time.Since(restarted).Round(time.Millisecond))
	apply("route.yaml", adsRoute("    - destinations: [{subset: v2}]\n"))
	waitUntil(t, 30*time.Second, "route change after writd's restart", func() bool {
		for range 5 {
			if _, body := get(up); body != "v2" {
				return false
			}
		}
		return true
	})
}

// registerSidecars registers the writ-proxy executable exe, run as this
// test's uid, on each node (the map's keys) as the shop namespace's
// service account named by the value.
func (w *auditWritd) registerSidecars(t *testing.T, exe string, nodes map[string]string) {
	t.Helper()
	uid := fmt.Sprint(os.Geteuid())
	for node, sa := range nodes {
		if out, code := w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/"+node, "--spiffe-id", "spiffe://example.org/ns/shop/sa/"+sa,
			"--selector", "unix:uid:"+uid, "--selector", "unix:path:"+exe); code != 0 {
			t.Fatalf("entry create: %s", out)
		}
	}
}
