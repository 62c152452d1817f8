package test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
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
	pg := startPG(t)
	w := newAuditWritd(t, pg.url)
	exe := filepath.Join(binDir(t), "writ-proxy")
	uid := fmt.Sprint(os.Geteuid())
	for node, sa := range map[string]string{"orders-v1": "orders", "frontend": "frontend"} {
		if out, code := w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/"+node, "--spiffe-id", "spiffe://example.org/ns/shop/sa/"+sa,
			"--selector", "unix:uid:"+uid, "--selector", "unix:path:"+exe); code != 0 {
			t.Fatalf("entry create: %s", out)
		}
	}
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
	orders := startADSProxy(t, w, "orders-v1", "--inbound", freeAddr(t), "--app", app, "--version", "v1", "--policy-dir", policyDir)
	up := freeAddr(t)
	startADSProxy(t, w, "frontend", "--upstream", "orders="+up)

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	call := func(method string) int {
		req, _ := http.NewRequest(method, "http://"+up+"/items", strings.NewReader("x"))
		resp, err := client.Do(req)
		if err != nil {
			return 0
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	waitUntil(t, 30*time.Second, "frontend reaches orders", func() bool { return call("GET") == 200 })
	if code := call("POST"); code != 200 {
		t.Fatalf("POST before the second policy: %d, want 200", code)
	}
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
	if code := call("POST"); code != 200 {
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
	waitUntil(t, 30*time.Second, "the new rule enforced", func() bool { return call("POST") == http.StatusForbidden })
	if code := call("GET"); code != 200 {
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
