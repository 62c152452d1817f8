package test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestWritProxyPolicyBundle: writ-proxies configured over ADS take their
// policy from writd's bundle service over mTLS with the workload's SVID
// (--policy-bundle), not from a local directory. A policy change in
// writd's directory reaches the running sidecar (ETag polling, hot swap);
// a broken edit changes nothing; the AuthorizationPolicy's dry-run mode
// lets what policy denies through; a policy binding another package's
// rule is decided by that rule; and a sidecar whose bundle cannot be had
// does not start: not ready, saying why, its mesh port closed.
func TestWritProxyPolicyBundle(t *testing.T) {
	root := repoRoot(t)
	pg := startPG(t)
	admin := t.TempDir()
	rego, err := os.ReadFile(filepath.Join(root, "policies", "admin", "admin.rego"))
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(admin, "admin.rego"), string(rego))
	// Sidecars of namespace shop may read the mesh bundle.
	write(t, filepath.Join(admin, "data.json"), `{"writ": {"decision_api": {"grants": [
		{"callers": ["spiffe://example.org/ns/shop/sa/*"], "apis": ["bundles"], "paths": ["mesh"]}]}}}`)
	policyDir := t.TempDir()
	write(t, filepath.Join(policyDir, "mesh.rego"), meshPolicy)
	// A second rule an AuthorizationPolicy can bind instead: only
	// stranger may call.
	write(t, filepath.Join(policyDir, "other.rego"), "package writ.other\n\ndefault allow := false\n\nallow if input.writ.source.service_account == \"stranger\"\n")
	decisionAddr := freeAddr(t)
	w := newAuditWritdWith(t, pg.url, writdOptions{listenDecision: decisionAddr, extra: fmt.Sprintf(
		"decision:\n  policy_dir: %s\n  admin_policy_dir: %s\npolicy:\n  dir: %s\n  bundle_name: mesh\n  poll_interval: 100ms\n",
		filepath.Join(root, "api", "decision", "testdata", "policy"), admin, policyDir)})
	exe := filepath.Join(binDir(t), "writ-proxy")
	w.registerSidecars(t, exe, map[string]string{"orders-v1": "orders", "orders-v2": "orders", "frontend": "frontend", "stranger": "stranger"})
	meshFile := filepath.Join(t.TempDir(), "mesh.yaml")
	write(t, meshFile, adsMesh+"---\n"+adsRoute("    - destinations: [{subset: v1}]\n"))
	if out, code := w.writ(t, "apply", "-f", meshFile); code != 0 {
		t.Fatalf("apply: %s", out)
	}
	bundleURL := "https://" + decisionAddr + "/bundles/mesh"
	app := serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "v1") }))
	startADSProxy(t, w, "orders-v1", "--inbound", freeAddr(t), "--app", app, "--version", "v1",
		"--policy-bundle", bundleURL, "--policy-bundle-poll", "100ms")
	up, strangerUp := freeAddr(t), freeAddr(t)
	startADSProxy(t, w, "frontend", "--upstream", "orders="+up)
	startADSProxy(t, w, "stranger", "--upstream", "orders="+strangerUp)

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	get := func(addr string) int {
		resp, err := client.Get("http://" + addr + "/items")
		if err != nil {
			return 0
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	waitUntil(t, 30*time.Second, "frontend allowed by the bundle's policy", func() bool { return get(up) == http.StatusOK })
	if code := get(strangerUp); code != http.StatusForbidden {
		t.Fatalf("stranger -> orders: %d, want 403", code)
	}

	// The AuthorizationPolicy's mode reaches the sidecar: in dry-run the
	// policy's denial is recorded and the request goes through; back in
	// enforce mode it is refused again.
	setMode := func(mode string) {
		t.Helper()
		write(t, meshFile, strings.Replace(adsMesh, "mode: enforce", "mode: "+mode, 1)+"---\n"+adsRoute("    - destinations: [{subset: v1}]\n"))
		if out, code := w.writ(t, "apply", "-f", meshFile); code != 0 {
			t.Fatalf("apply: %s", out)
		}
	}
	setMode("dry-run")
	waitUntil(t, 30*time.Second, "stranger let through in dry-run mode", func() bool { return get(strangerUp) == http.StatusOK })
	setMode("enforce")
	waitUntil(t, 30*time.Second, "stranger refused again in enforce mode", func() bool { return get(strangerUp) == http.StatusForbidden })

	// Hot swap: writd's policy now lets stranger in too; the sidecar
	// polls the new bundle and decides by it without a restart.
	write(t, filepath.Join(policyDir, "mesh.rego"), meshPolicy+`
allow if input.writ.source.service_account == "stranger"
`)
	waitUntil(t, 30*time.Second, "stranger allowed after the policy change", func() bool { return get(strangerUp) == http.StatusOK })
	// A broken edit is never served: the last good policy stays.
	write(t, filepath.Join(policyDir, "mesh.rego"), "package envoy.authz\n\nallow if {\n")
	time.Sleep(time.Second) // several poll periods of writd and the sidecar
	if code, code2 := get(strangerUp), get(up); code != http.StatusOK || code2 != http.StatusOK {
		t.Fatalf("after a broken policy edit: stranger %d, frontend %d; want the last good policy (200, 200)", code, code2)
	}

	// An AuthorizationPolicy binding another package's decision: the
	// sidecar decides that listener by data.writ.other.allow.
	write(t, meshFile, strings.Replace(adsMesh, "package: envoy.authz", "package: writ.other", 1)+"---\n"+adsRoute("    - destinations: [{subset: v1}]\n"))
	if out, code := w.writ(t, "apply", "-f", meshFile); code != 0 {
		t.Fatalf("apply: %s", out)
	}
	waitUntil(t, 30*time.Second, "frontend refused by writ.other", func() bool { return get(up) == http.StatusForbidden })
	if code := get(strangerUp); code != http.StatusOK {
		t.Fatalf("stranger under writ.other: %d, want 200", code)
	}

	// Fail closed: a sidecar whose bundle is refused (no such bundle)
	// never starts its mesh port.
	inbound := freeAddr(t)
	v2 := launchADSProxy(t, w, "orders-v2", "--inbound", inbound, "--app", app, "--version", "v2",
		"--policy-bundle", "https://"+decisionAddr+"/bundles/nope", "--policy-bundle-poll", "100ms")
	waitUntil(t, 30*time.Second, "orders-v2 waits for its first policy", func() bool {
		resp, err := http.Get("http://" + v2.admin + "/readyz")
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable && strings.Contains(string(b), "waiting for the first policy bundle")
	})
	if c, err := net.DialTimeout("tcp", inbound, time.Second); err == nil {
		c.Close()
		t.Fatal("the mesh port of a sidecar without policy accepts connections")
	}
}
