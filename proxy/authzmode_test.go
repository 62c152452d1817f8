package proxy

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/regotest"
	"github.com/writmesh/writ/xds"
)

// TestDryRunModeInbound: an inbound listener whose AuthorizationPolicy is
// in dry-run mode lets a request policy denies through and records the
// denial as what the policy would have done; in enforce mode the same
// request is refused. A listener bound to another decision than the
// proxy's policy is refused, and the running one stays.
func TestDryRunModeInbound(t *testing.T) {
	ca := newTestCA(t)
	appL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	appSrv := &http.Server{Handler: echoApp(nil)}
	go appSrv.Serve(appL)
	t.Cleanup(func() { appSrv.Close() })

	// A fixed port, so that the listener's changes rebind it.
	probe, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mesh := probe.Addr().String()
	probe.Close()
	dec := &decisions{}
	in := Inbound{Name: "mesh", Address: mesh, Service: "server", App: appL.Addr().String(), AuthzMode: AuthzDryRun, AuthzDecision: "data.envoy.authz.allow"}
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
	if err := srv.Update(&Config{Inbound: []Inbound{enforce}}); err != nil {
		t.Fatal(err)
	}
	if code := get(); code != http.StatusForbidden {
		t.Fatalf("enforce mode: got %d, want 403", code)
	}
}

// TestContextKeysAgree: writd and the enforcer name the context
// extensions alike.
func TestContextKeysAgree(t *testing.T) {
	if xds.AuthzModeContextKey != enforcer.ModeContextKey || xds.AuthzDecisionContextKey != enforcer.DecisionContextKey {
		t.Fatalf("xds %q %q, enforcer %q %q", xds.AuthzModeContextKey, xds.AuthzDecisionContextKey, enforcer.ModeContextKey, enforcer.DecisionContextKey)
	}
}
