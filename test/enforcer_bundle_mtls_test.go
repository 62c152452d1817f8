package test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/genproto/googleapis/rpc/code"

	"github.com/writmesh/writ/authority/agent"
)

// startWritdAgent runs a node agent attested to the writd process w with a
// join token, serving the Workload API to this uid for ids, which it
// registers under the node first.
func startWritdAgent(t testing.TB, w *writd, node string, ids ...spiffeid.ID) string {
	t.Helper()
	parent := "spiffe://example.org/node/" + node
	out, code := w.writ(t, "token", "create", "--spiffe-id", parent, "--ttl", "5m")
	tok := regexp.MustCompile(`Token: (\S+)`).FindStringSubmatch(out)
	if code != 0 || tok == nil {
		t.Fatalf("token create: %d %s", code, out)
	}
	for _, id := range ids {
		if out, code := w.writ(t, "entry", "create", "--parent", parent, "--spiffe-id", id.String(), "--selector", fmt.Sprintf("unix:uid:%d", os.Geteuid())); code != 0 {
			t.Fatalf("entry create: %d %s", code, out)
		}
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	bundle, err := spiffebundle.Parse(td, []byte(w.get(t, "/bundle")))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a, err := agent.New(agent.Config{ControlPlane: w.grpc, JoinToken: tok[1], TrustDomain: td, TrustBundle: bundle, SyncInterval: time.Second})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "writ-e2e-")
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	addr := "unix://" + filepath.Join(dir, "agent.sock")
	l, _, err := agent.ListenUnix(addr)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{}, 2)
	go func() { _ = a.Run(ctx); done <- struct{}{} }()
	go func() { _ = a.Serve(ctx, l); done <- struct{}{} }()
	t.Cleanup(func() {
		cancel()
		<-done
		<-done
		os.RemoveAll(dir)
	})
	return addr
}

// TestEnforcerPullsBundleOverMTLS: writd serves its policy bundle only
// over mTLS on the decision API's listener; a writ-enforcer process whose
// SVID comes from writd (through a node agent) pulls it there, the admin
// policy deciding, and answers by it. The plain HTTP listener does not
// serve it.
func TestEnforcerPullsBundleOverMTLS(t *testing.T) {
	root := repoRoot(t)
	admin := t.TempDir()
	rego, err := os.ReadFile(filepath.Join(root, "policies", "admin", "admin.rego"))
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(admin, "admin.rego"), string(rego))
	write(t, filepath.Join(admin, "data.json"), `{"writ": {"decision_api": {"grants": [
		{"callers": ["spiffe://example.org/ns/writ/sa/*"], "apis": ["bundles"], "paths": ["mesh"]}]}}}`)
	decisionAddr := freeAddr(t)
	w := startWritd(t, writdOptions{listenDecision: decisionAddr, extra: fmt.Sprintf(
		"decision:\n  policy_dir: %s\n  admin_policy_dir: %s\npolicy:\n  dir: %s\n  bundle_name: mesh\n  poll_interval: 100ms\n",
		filepath.Join(root, "api", "decision", "testdata", "policy"), admin, meshPolicyDir(t))})

	resp, err := http.Get("http://" + w.http + "/bundles/mesh")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("plain HTTP /bundles/mesh: %s, want 404 without policy.plain_http", resp.Status)
	}

	wl := startWritdAgent(t, w, "enf", enforcerID, clientID)
	p := startEnforcer(t, "--workload-api", wl, "--spiffe-id", enforcerID.String(),
		"--bundle-url", "https://"+decisionAddr+"/bundles/mesh", "--bundle-poll", "100ms")
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(sctx, workloadapi.WithClientOptions(workloadapi.WithAddr(wl)), pick(clientID))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	client := authv3.NewAuthorizationClient(dialEnforcer(t, src, p.listen))
	for src, want := range map[string]code.Code{clientID.String(): code.Code_OK, "spiffe://example.org/ns/demo/sa/intruder": code.Code_PERMISSION_DENIED} {
		resp, err := client.Check(sctx, checkReq(src, serverID.String(), "GET", "/items/7"))
		if err != nil {
			t.Fatal(err)
		}
		if got := code.Code(resp.GetStatus().GetCode()); got != want {
			t.Fatalf("%s: %v, want %v\n%s", src, got, want, p.log)
		}
	}
}
