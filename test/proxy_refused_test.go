package test

import (
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRefusedConfigTakenAfterPolicyReload: writd binds an enforced
// AuthorizationPolicy whose Rego rule the sidecar's --policy-dir does not
// define; writ-proxy NACKs that version and keeps serving the one in
// force (fail closed). Once the rule is written to --policy-dir, the
// sidecar's policy reload applies the refused version and ACKs it: the
// listener enforces the new rule and writd records the version as in
// force, though nothing in writd changed after the NACK.
func TestRefusedConfigTakenAfterPolicyReload(t *testing.T) {
	m := startRefusedMesh(t, nil)
	w, orders, call, apply, policyDir := m.w, m.orders, m.call, m.apply, m.policyDir
	good := orders.dump(t).XDS.Version

	// An enforced policy on a rule orders' sidecar does not have: NACKed,
	// the old configuration stays.
	apply("authz.yaml", "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: orders-methods, namespace: shop}\nspec:\n  service: orders\n  package: writ.methods\n  mode: enforce\n")
	const reason = "nothing defines decision path data.writ.methods.allow"
	var lastErr string
	waitUntil(t, 30*time.Second, "NACK", func() bool {
		lastErr = orders.dump(t).XDS.LastError
		return strings.Contains(lastErr, reason)
	})
	refused, _, ok := strings.Cut(strings.TrimPrefix(lastErr, "version "), " refused:")
	if !ok || refused == good {
		t.Fatalf("last error %q: no refused version", lastErr)
	}
	if d := orders.dump(t); d.XDS.Version != good {
		t.Fatalf("version in force after the NACK: %s, want %s", d.XDS.Version, good)
	}
	if code := call("POST", "/items"); code != 200 {
		t.Fatalf("POST under the configuration kept in force: %d, want 200", code)
	}
	if out, code := w.writ(t, "mesh", "nodes"); code != 0 || !strings.Contains(out, reason) {
		t.Fatalf("writ mesh nodes does not show the NACK (%d):\n%s", code, out)
	}

	// The rule arrives with a policy reload: the refused version is
	// applied and ACKed, and both rules decide (writ.methods allows GET
	// only).
	write(t, filepath.Join(policyDir, "methods.rego"), "package writ.methods\n\ndefault allow := false\n\nallow if input.attributes.request.http.method == \"GET\"\n")
	waitUntil(t, 30*time.Second, "refused version taken after the policy reload", func() bool {
		d := orders.dump(t)
		return d.XDS.Version == refused && d.XDS.LastError == ""
	})
	waitUntil(t, 30*time.Second, "the new rule enforced", func() bool { return call("POST", "/items") == http.StatusForbidden })
	if code := call("GET", "/items"); code != 200 {
		t.Fatalf("GET under both rules: %d, want 200", code)
	}
	// writd has it as the version in force (ACKed) on the node, and the
	// refusal's reason is gone.
	var nodes string
	waitUntil(t, 30*time.Second, "writd records the ACK", func() bool {
		out, code := w.writ(t, "mesh", "nodes")
		nodes = out
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "/ns/shop/sa/orders") && strings.Count(line, refused) == 2 && !strings.Contains(line, reason) {
				return code == 0
			}
		}
		return false
	})
	t.Logf("writ mesh nodes:\n%s", nodes)
	if d := orders.dump(t); d.XDS.Version != refused {
		t.Fatalf("version in force: %s, want %s", d.XDS.Version, refused)
	}
}

// refusedMesh is writd, an orders sidecar whose --policy-dir the tests
// edit, and a frontend sidecar calling it (call sends method to
// /items through the pair and returns the status, 0 on a failure).
type refusedMesh struct {
	w         *auditWritd
	orders    *adsProxy
	policyDir string
	apply     func(name, yaml string)
	call      func(method, path string) int
}

// startRefusedMesh starts the mesh; orders reaches writd's ADS through
// xdsVia(writd's gRPC address) if set.
func startRefusedMesh(t *testing.T, xdsVia func(string) string) *refusedMesh {
	t.Helper()
	pg := startPG(t)
	w := newAuditWritd(t, pg.url)
	exe := filepath.Join(binDir(t), "writ-proxy")
	w.registerSidecars(t, exe, map[string]string{"orders-v1": "orders", "frontend": "frontend"})
	meshDir := t.TempDir()
	apply := func(name, yaml string) {
		t.Helper()
		f := filepath.Join(meshDir, name)
		write(t, f, yaml)
		if out, code := w.writ(t, "apply", "-f", f); code != 0 {
			t.Fatalf("apply %s: %s", name, out)
		}
	}
	apply("mesh.yaml", adsMesh)
	apply("route.yaml", adsRoute("    - destinations: [{subset: v1}]\n"))
	policyDir := t.TempDir()
	write(t, filepath.Join(policyDir, "mesh.rego"), meshPolicy)
	app := serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "v1") }))
	args := []string{"--inbound", freeAddr(t), "--app", app, "--version", "v1", "--policy-dir", policyDir}
	if xdsVia != nil {
		args = append(args, "--xds-server", xdsVia(w.grpc))
	}
	orders := startADSProxy(t, w, "orders-v1", args...)
	up := freeAddr(t)
	startADSProxy(t, w, "frontend", "--upstream", "orders="+up)

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	t.Cleanup(client.CloseIdleConnections)
	call := func(method, path string) int {
		req, _ := http.NewRequest(method, "http://"+up+path, strings.NewReader("x"))
		resp, err := client.Do(req)
		if err != nil {
			return 0
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	waitUntil(t, 30*time.Second, "frontend reaches orders", func() bool { return call("GET", "/items") == 200 })
	return &refusedMesh{w: w, orders: orders, policyDir: policyDir, apply: apply, call: call}
}

// TestRefusedConfigTakenAfterReconnect: orders' ADS stream to writd is
// cut on the sidecar's side only (writd keeps the old stream, as after a
// fault seen by one end) while a refused version is outstanding. On the
// new stream writd offers its current version again: refused again, the
// reason is back in the sidecar's status and the version in force stays;
// taken at the next policy reload. Then a second refused version, and
// the reload that makes it acceptable happens while the sidecar cannot
// reach writd: it takes that version as soon as it is back.
func TestRefusedConfigTakenAfterReconnect(t *testing.T) {
	var rl *cutRelay
	m := startRefusedMesh(t, func(writd string) string {
		rl = startCutRelay(t, writd)
		return rl.addr
	})
	orders, call, apply := m.orders, m.call, m.apply
	good := orders.dump(t).XDS.Version
	// nacked waits for the sidecar to refuse a version for reason and
	// returns that version.
	nacked := func(reason string) string {
		t.Helper()
		var lastErr string
		waitUntil(t, 30*time.Second, "NACK", func() bool {
			lastErr = orders.dump(t).XDS.LastError
			return strings.Contains(lastErr, reason)
		})
		v, _, ok := strings.Cut(strings.TrimPrefix(lastErr, "version "), " refused:")
		if !ok {
			t.Fatalf("last error %q: no refused version", lastErr)
		}
		return v
	}
	// reconnected cuts the stream and waits for the sidecar's answer to
	// the first configuration on its next one.
	reconnected := func() adsDump {
		t.Helper()
		n := rl.cut()
		var d adsDump
		waitUntil(t, 60*time.Second, "a new stream answered", func() bool {
			if rl.accepted() <= n {
				return false
			}
			d = orders.dump(t)
			return d.XDS.Connected && !strings.HasPrefix(d.XDS.LastError, "stream:")
		})
		return d
	}

	apply("authz.yaml", "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: orders-methods, namespace: shop}\nspec:\n  service: orders\n  package: writ.methods\n  mode: enforce\n")
	const reason = "nothing defines decision path data.writ.methods.allow"
	refused := nacked(reason)
	if refused == good {
		t.Fatalf("refused version %s is the one in force", refused)
	}

	// Reconnected while the rule is still missing: refused again, with
	// its reason; nothing older or newer is put in force.
	if d := reconnected(); d.XDS.Version != good || !strings.Contains(d.XDS.LastError, reason) {
		t.Fatalf("after reconnecting: version %s, last error %q; want %s still in force and the refusal %q", d.XDS.Version, d.XDS.LastError, good, reason)
	}
	if code := call("POST", "/items"); code != 200 {
		t.Fatalf("POST under the configuration kept in force: %d, want 200", code)
	}
	// The rule arrives: the version refused on this stream is taken.
	write(t, filepath.Join(m.policyDir, "methods.rego"), "package writ.methods\n\ndefault allow := false\n\nallow if input.attributes.request.http.method == \"GET\"\n")
	waitUntil(t, 30*time.Second, "refused version taken after the policy reload", func() bool {
		d := orders.dump(t)
		return d.XDS.Version == refused && d.XDS.LastError == ""
	})
	waitUntil(t, 30*time.Second, "the new rule enforced", func() bool { return call("POST", "/items") == http.StatusForbidden })

	// A second policy on a rule not yet there: refused.
	apply("authz2.yaml", "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: orders-paths, namespace: shop}\nspec:\n  service: orders\n  package: writ.paths\n  mode: enforce\n")
	const reason2 = "nothing defines decision path data.writ.paths.allow"
	refused2 := nacked(reason2)
	if code := call("GET", "/other"); code != 200 {
		t.Fatalf("GET /other under the configuration kept in force: %d, want 200", code)
	}
	// writd cannot be reached while the rule arrives and is loaded.
	rl.block(true)
	loads := strings.Count(orders.out.String(), "policy loaded")
	write(t, filepath.Join(m.policyDir, "paths.rego"), "package writ.paths\n\ndefault allow := false\n\nallow if input.attributes.request.http.path == \"/items\"\n")
	waitUntil(t, 30*time.Second, "policy reloaded", func() bool { return strings.Count(orders.out.String(), "policy loaded") > loads })
	rl.block(false)
	if d := reconnected(); d.XDS.Version != refused2 || d.XDS.LastError != "" {
		t.Fatalf("after reconnecting: version %s, last error %q; want %s taken", d.XDS.Version, d.XDS.LastError, refused2)
	}
	waitUntil(t, 30*time.Second, "the second rule enforced", func() bool { return call("GET", "/other") == http.StatusForbidden })
	if code := call("GET", "/items"); code != 200 {
		t.Fatalf("GET /items under both rules: %d, want 200", code)
	}
}

// cutRelay forwards TCP connections to a server. cut closes the client
// side of every connection it carries and leaves the server side open
// and silent, as a fault seen by one end only: the server keeps its
// streams until it writes into the void long enough to notice. While
// blocked it closes new connections at once.
type cutRelay struct {
	addr    string
	target  string
	mu      sync.Mutex
	n       int
	closed  bool
	blocked bool
	front   []net.Conn
	back    []net.Conn
}

func startCutRelay(t *testing.T, target string) *cutRelay {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &cutRelay{addr: l.Addr().String(), target: target}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			r.mu.Lock()
			if r.blocked || r.closed {
				r.mu.Unlock()
				c.Close()
				continue
			}
			r.n++
			r.mu.Unlock()
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			r.mu.Lock()
			r.front, r.back = append(r.front, c), append(r.back, s)
			r.mu.Unlock()
			// Neither direction closes the other side: the server's
			// connection outlives a cut.
			go io.Copy(s, c)
			go io.Copy(c, s)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		r.mu.Lock()
		defer r.mu.Unlock()
		r.closed = true
		for _, c := range append(r.front, r.back...) {
			c.Close()
		}
	})
	return r
}

// cut closes the client side of the connections carried so far and
// returns how many were accepted.
func (r *cutRelay) cut() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.front {
		c.Close()
	}
	r.front = nil
	return r.n
}

func (r *cutRelay) accepted() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

func (r *cutRelay) block(v bool) {
	r.mu.Lock()
	r.blocked = v
	r.mu.Unlock()
}
