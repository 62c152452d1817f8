package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/regotest"
	"github.com/writmesh/writ/policy"
	"github.com/writmesh/writ/xds"
)

// TestDryRunModeInbound: an inbound listener whose AuthorizationPolicy is
// in dry-run mode lets a request policy denies through and records the
// denial as what the policy would have done; in enforce mode the same
// request is refused. A listener bound to another decision than the
// proxy's policy is refused, and the running one stays.
func TestDryRunModeInbound(t *testing.T) {
	ca := newTestCA(t)
	appAddr := serveApp(t, echoApp(nil))

	// A fixed port, so that the listener's changes rebind it.
	probe, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mesh := probe.Addr().String()
	probe.Close()
	dec := &decisions{}
	in := Inbound{Name: "mesh", Address: mesh, Service: "server", App: appAddr, AuthzMode: AuthzDryRun, AuthzDecision: "data.envoy.authz.allow"}
	srv := startProxy(t, &Config{Inbound: []Inbound{in}}, Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, dec)})
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	// "other" is not allowed by allowClientRego.
	cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/other")})
	get := func() int {
		resp, err := http.Get("http://" + cli.Addr("upstream:server") + "/a")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(); code != http.StatusOK {
		t.Fatalf("dry-run mode: got %d, want 200", code)
	}
	dec.mu.Lock()
	d := dec.got[len(dec.got)-1]
	dec.mu.Unlock()
	if d.Result != enforcer.ResultAllow || d.Cause != enforcer.CauseDryRunMode || d.DryRun == nil || d.DryRun.Result != enforcer.ResultDeny {
		t.Fatalf("dry-run decision recorded as %+v (dry run %+v)", d, d.DryRun)
	}

	// Another decision than the proxy's policy is refused.
	bad := in
	bad.AuthzDecision = "data.other.allow"
	if err := srv.Update(&Config{Inbound: []Inbound{bad}}); err == nil || !strings.Contains(err.Error(), "data.other.allow") {
		t.Fatalf("update with another decision: %v", err)
	}
	if code := get(); code != http.StatusOK {
		t.Fatalf("after a refused update: got %d, want the dry-run listener's 200", code)
	}

	enforce := in
	enforce.AuthzMode = AuthzEnforce
	srv.lmu.Lock()
	retired := srv.inbound[0]
	srv.lmu.Unlock()
	if err := srv.Update(&Config{Inbound: []Inbound{enforce}}); err != nil {
		t.Fatal(err)
	}
	if code := get(); code != http.StatusForbidden {
		t.Fatalf("enforce mode: got %d, want 403", code)
	}
	// A request still arriving on a connection of the replaced listener
	// (its drain runs after Update returns) is decided by the new one.
	req := httptest.NewRequest("GET", "/a", nil)
	req = req.WithContext(context.WithValue(req.Context(), peerKey{}, &peerInfo{id: "spiffe://example.org/ns/demo/sa/other", namespace: "demo", workload: "other",
		source: &authv3.AttributeContext_Peer{Principal: "spiffe://example.org/ns/demo/sa/other"}, dest: &authv3.AttributeContext_Peer{Service: "server"}}))
	rec := httptest.NewRecorder()
	retired.ServeHTTP(rec, req)
	if rec.Code != http.StatusForbidden {
		t.Fatalf("request on the replaced listener: got %d, want 403 from the new listener's enforce mode", rec.Code)
	}
}

// TestContextKeysAgree: writd and the enforcer name the context
// extensions alike.
func TestContextKeysAgree(t *testing.T) {
	if xds.AuthzModeContextKey != enforcer.ModeContextKey || xds.AuthzDecisionContextKey != enforcer.DecisionContextKey || xds.AuthzDryRunContextKey != enforcer.DryRunContextKey {
		t.Fatalf("xds %q %q %q, enforcer %q %q %q", xds.AuthzModeContextKey, xds.AuthzDecisionContextKey, xds.AuthzDryRunContextKey, enforcer.ModeContextKey, enforcer.DecisionContextKey, enforcer.DryRunContextKey)
	}
}

// TestEnforcerForOtherDecision: a listener whose AuthorizationPolicy binds
// another decision than the proxy's policy is decided by the enforcer
// EnforcerFor gives for it; several decisions (several enforced
// policies) are accepted and every one must allow, and dry-run ones
// beside them are evaluated and recorded but never enforced, through a
// real enforcer.Binder as writ-proxy wires it.
func TestEnforcerForOtherDecision(t *testing.T) {
	ca := newTestCA(t)
	appAddr := serveApp(t, echoApp(nil))
	dir := t.TempDir()
	// Only "other" may call, by the rule writ.other.allow.
	if err := os.WriteFile(filepath.Join(dir, "other.rego"), []byte("package writ.other\n\ndefault allow := false\n\nallow if input.writ.source.service_account == \"other\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "path.rego"), []byte("package writ.path\n\ndefault allow := false\n\nallow if startswith(input.attributes.request.http.path, \"/a\")\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var getPath func(clientPath, path string) int
	eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir, DecisionPath: "data.writ.other.allow"})
	if err != nil {
		t.Fatal(err)
	}
	dec := &decisions{}
	other, err := enforcer.New(enforcer.Options{Engine: eng, Sink: dec})
	if err != nil {
		t.Fatal(err)
	}
	binder := enforcer.NewBinder(enforcer.Options{Engine: eng, Sink: dec}, func(ctx context.Context, d string) (*policy.Engine, error) {
		return policy.NewEngine(ctx, policy.Options{Dir: dir, DecisionPath: d})
	})
	var asked []string
	in := Inbound{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appAddr, AuthzMode: AuthzEnforce, AuthzDecision: "data.writ.other.allow"}
	srv := startProxy(t, &Config{Inbound: []Inbound{in}}, Options{Source: ca.source(t, "/ns/demo/sa/server"),
		Enforcer: regotest.Enforcer(t, allowClientRego, &decisions{}),
		EnforcerFor: func(d, dry string) (*enforcer.Enforcer, error) {
			asked = append(asked, d)
			if d == "data.writ.other.allow" && dry == "" {
				return other, nil
			}
			return binder.For(context.Background(), d, dry)
		}})
	get := func(clientPath string) int { return getPath(clientPath, "/a") }
	getPath = func(clientPath, path string) int {
		cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
		cfg.AddUpstream("server", "127.0.0.1:0")
		cli := startProxy(t, cfg, Options{Source: ca.source(t, clientPath)})
		resp, err := http.Get("http://" + cli.Addr("upstream:server") + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if a, b := get("/ns/demo/sa/other"), get("/ns/demo/sa/client"); a != http.StatusOK || b != http.StatusForbidden {
		t.Fatalf("other %d, client %d: want 200 and 403 by writ.other.allow", a, b)
	}
	if len(asked) != 1 || len(dec.got) != 2 {
		t.Fatalf("asked %v, %d decisions by the bound rule", asked, len(dec.got))
	}
	both := in
	both.AuthzDecision = "data.writ.other.allow,data.writ.path.allow"
	if err := srv.Update(&Config{Inbound: []Inbound{both}}); err != nil {
		t.Fatalf("several decisions: %v", err)
	}
	if a, b, c := getPath("/ns/demo/sa/other", "/a"), getPath("/ns/demo/sa/other", "/b"), getPath("/ns/demo/sa/client", "/a"); a != http.StatusOK || b != http.StatusForbidden || c != http.StatusForbidden {
		t.Fatalf("other /a %d, other /b %d, client /a %d: want 200, 403, 403 (both rules must allow)", a, b, c)
	}
	// writ.path.allow in dry-run beside the enforced writ.other.allow:
	// other's /b is allowed and recorded as what writ.path would have
	// denied; client's /a is denied and recorded as its allow.
	dry := in
	dry.AuthzDryRun = "data.writ.path.allow"
	if err := srv.Update(&Config{Inbound: []Inbound{dry}}); err != nil {
		t.Fatalf("dry run beside: %v", err)
	}
	for _, tc := range []struct {
		client, path string
		status       int
		dryResult    string
	}{
		{"/ns/demo/sa/other", "/b", http.StatusOK, enforcer.ResultDeny},
		{"/ns/demo/sa/client", "/a", http.StatusForbidden, enforcer.ResultAllow},
	} {
		n := len(dec.got)
		if got := getPath(tc.client, tc.path); got != tc.status {
			t.Fatalf("%s %s with a dry-run policy beside: %d, want %d", tc.client, tc.path, got, tc.status)
		}
		if len(dec.got) != n+1 {
			t.Fatalf("%d decisions recorded, want 1", len(dec.got)-n)
		}
		if dr := dec.got[n].DryRun; dr == nil || dr.Result != tc.dryResult || !dr.Disagrees {
			t.Fatalf("%s %s: dry run %+v, want %s disagreeing", tc.client, tc.path, dr, tc.dryResult)
		}
	}
	bad := in
	bad.AuthzDecision = "data.nope.allow"
	if err := srv.Update(&Config{Inbound: []Inbound{bad}}); err == nil || !strings.Contains(err.Error(), "nothing defines decision path data.nope.allow") {
		t.Fatalf("unknown decision: %v", err)
	}
}
