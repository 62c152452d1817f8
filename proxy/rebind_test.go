package proxy

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/policy"
)

// TestRebindAfterPolicyReload: a listener bound while its dry-run rule
// was missing records that error on every request; once a policy reload
// defines the rule, Rebind has the listener's requests evaluated by it,
// with no configuration change.
func TestRebindAfterPolicyReload(t *testing.T) {
	ca := newTestCA(t)
	appAddr := serveApp(t, echoApp(nil))
	dir := t.TempDir()
	write := func(name, rego string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(rego), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("other.rego", "package writ.other\n\ndefault allow := false\n\nallow if input.writ.source.service_account == \"other\"\n")
	ctx := context.Background()
	eng, err := policy.NewEngine(ctx, policy.Options{Dir: dir, DecisionPath: "data.writ.other.allow"})
	if err != nil {
		t.Fatal(err)
	}
	dec := &decisions{}
	binder := enforcer.NewBinder(enforcer.Options{Engine: eng, Sink: dec}, func(ctx context.Context, d string) (*policy.Engine, error) {
		return policy.NewEngine(ctx, policy.Options{Dir: dir, DecisionPath: d})
	})
	base, err := enforcer.New(enforcer.Options{Engine: eng, Sink: dec})
	if err != nil {
		t.Fatal(err)
	}
	in := Inbound{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appAddr, AuthzMode: AuthzEnforce,
		AuthzDecision: "data.writ.other.allow", AuthzDryRun: "data.writ.path.allow"}
	srv := startProxy(t, &Config{Inbound: []Inbound{in}}, Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: base,
		EnforcerFor: func(d, dry string) (*enforcer.Enforcer, error) { return binder.For(ctx, d, dry) }})
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/other")})
	get := func(path string) (int, *enforcer.DryRun) {
		t.Helper()
		dec.mu.Lock()
		n := len(dec.got)
		dec.mu.Unlock()
		resp, err := http.Get("http://" + cli.Addr("upstream:server") + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		dec.mu.Lock()
		defer dec.mu.Unlock()
		if len(dec.got) != n+1 {
			t.Fatalf("%s: %d decisions recorded, want 1", path, len(dec.got)-n)
		}
		return resp.StatusCode, dec.got[n].DryRun
	}

	for range 2 {
		code, dr := get("/b")
		if code != http.StatusOK || dr == nil || !strings.Contains(dr.Reason, "dry-run policy") || !strings.Contains(dr.Reason, "data.writ.path.allow") {
			t.Fatalf("with the dry-run rule missing: %d, dry run %+v; want 200 and the binding error recorded", code, dr)
		}
	}

	write("path.rego", "package writ.path\n\ndefault allow := false\n\nallow if startswith(input.attributes.request.http.path, \"/a\")\n")
	if err := eng.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if err := binder.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if err := srv.Rebind(); err != nil {
		t.Fatal(err)
	}
	if code, dr := get("/b"); code != http.StatusOK || dr == nil || dr.Result != enforcer.ResultDeny || !dr.Disagrees || strings.Contains(dr.Reason, "dry-run policy:") {
		t.Fatalf("/b after the reload: %d, dry run %+v; want 200 and writ.path's deny recorded", code, dr)
	}
	if code, dr := get("/a"); code != http.StatusOK || dr == nil || dr.Result != enforcer.ResultAllow || dr.Disagrees {
		t.Fatalf("/a after the reload: %d, dry run %+v; want 200 and writ.path's allow recorded", code, dr)
	}
}
