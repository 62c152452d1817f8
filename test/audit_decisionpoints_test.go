package test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/genproto/googleapis/rpc/code"
)

// countAudit counts audit_events rows matching where.
func countAudit(t testing.TB, dbURL, where string, args ...any) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var n int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM audit_events WHERE "+where, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitAudit waits until a row matching where exists, then checks that
// exactly one does.
func waitAudit(t *testing.T, dbURL, what, where string, args ...any) {
	t.Helper()
	waitUntil(t, 60*time.Second, what, func() bool { return countAudit(t, dbURL, where, args...) > 0 })
	if n := countAudit(t, dbURL, where, args...); n != 1 {
		t.Fatalf("%s: %d rows, want exactly 1", what, n)
	}
}

// TestProxyDecisionsReachPostgres: writd and two writ-proxy processes;
// orders' proxy decides inbound requests with --audit-spool-dir, and each
// decision arrives in PostgreSQL once, recorded under orders' SVID.
func TestProxyDecisionsReachPostgres(t *testing.T) {
	w := startWritd(t)
	exe := filepath.Join(binDir(t), "writ-proxy")
	uid := fmt.Sprint(os.Geteuid())
	for node, id := range map[string]string{"orders-node": "spiffe://example.org/ns/shop/sa/orders", "frontend-node": "spiffe://example.org/ns/shop/sa/frontend"} {
		if out, code := w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/"+node, "--spiffe-id", id,
			"--selector", "unix:uid:"+uid, "--selector", "unix:path:"+exe); code != 0 {
			t.Fatalf("entry create: %s", out)
		}
	}
	app := serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "orders here") }))
	policyDir := t.TempDir()
	write(t, filepath.Join(policyDir, "mesh.rego"), meshPolicy)
	mesh := freeAddr(t)
	spool := t.TempDir()
	startProxyProc(t, w, "orders-node", "--inbound", mesh, "--app", app, "--service", "orders", "--policy-dir", policyDir,
		"--audit-spool-dir", spool)
	cfgFile := filepath.Join(t.TempDir(), "proxy.yaml")
	write(t, cfgFile, fmt.Sprintf("clusters:\n- name: orders\n  lb_policy: ROUND_ROBIN\n  endpoints:\n  - address: %s\n  peer_ids: [spiffe://example.org/ns/shop/sa/orders]\n", mesh))
	up := freeAddr(t)
	startProxyProc(t, w, "frontend-node", "--proxy-config", cfgFile, "--upstream", "orders="+up)

	path := fmt.Sprintf("/audited/%d", time.Now().UnixNano())
	resp, err := http.Get("http://" + up + path)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "orders here" {
		t.Fatalf("frontend -> orders: %d %q", resp.StatusCode, body)
	}
	waitAudit(t, w.dbURL, "the proxy's decision in PostgreSQL",
		"kind = 'request' AND resource = $1 AND result = 'allow' AND principal = $2 AND starts_with(source, $3)",
		path, "spiffe://example.org/ns/shop/sa/frontend", "spiffe://example.org/ns/shop/sa/orders#")
	// The policy's first load, before the spool opened, is recorded too.
	waitAudit(t, w.dbURL, "the proxy's policy load",
		"kind = 'policy_change' AND action = 'reload' AND result = 'ok' AND resource = $1 AND starts_with(source, $2)",
		"dir:"+policyDir, "spiffe://example.org/ns/shop/sa/orders#")
	if out, code := w.writ(t, "audit", "verify"); code != 0 || !strings.Contains(out, "all chains intact") {
		t.Fatalf("audit verify: %d %s", code, out)
	}
}

// enforcerWithAudit is a real writd, a writ-proxy agent serving SVIDs
// for the enforcer and its client, and writ-enforcer deciding by the mesh
// policy with --audit-spool-dir, shipping to writd; it returns writd and
// an ext_authz client holding the client's SVID.
func enforcerWithAudit(t *testing.T) (*writd, authv3.AuthorizationClient) {
	t.Helper()
	w := startWritd(t)
	uid := fmt.Sprint(os.Geteuid())
	for _, id := range []string{enforcerID.String(), clientID.String()} {
		if out, code := w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/enf-node", "--spiffe-id", id,
			"--selector", "unix:uid:"+uid); code != 0 {
			t.Fatalf("entry create: %s", out)
		}
	}
	agent := startProxyProc(t, w, "enf-node")
	p := startEnforcer(t, "--workload-api", agent.sock, "--spiffe-id", enforcerID.String(), "--policy-dir", meshPolicyDir(t),
		"--audit-spool-dir", t.TempDir(), "--audit-collector", w.grpc)
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(sctx, workloadapi.WithClientOptions(workloadapi.WithAddr(agent.sock)), pick(clientID))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return w, authv3.NewAuthorizationClient(dialEnforcer(t, src, p.listen))
}

// TestEnforcerDecisionsReachPostgres: writ-enforcer with an SVID from a
// writ-proxy agent of a real writd, with --audit-spool-dir: an allowed
// and a denied check each arrive in PostgreSQL once, under its SVID, with
// the allowlisted headers and without credentials.
func TestEnforcerDecisionsReachPostgres(t *testing.T) {
	w, client := enforcerWithAudit(t)
	sctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stamp := time.Now().UnixNano()
	for _, c := range []struct {
		src, method, path string
		want              code.Code
	}{
		{clientID.String(), "GET", fmt.Sprintf("/ok/%d", stamp), code.Code_OK},
		{"spiffe://example.org/ns/demo/sa/intruder", "GET", fmt.Sprintf("/no/%d", stamp), code.Code_PERMISSION_DENIED},
	} {
		req := checkReq(c.src, serverID.String(), c.method, c.path)
		// Allowlisted headers are kept; credentials never are.
		req.Attributes.Request.Http.Headers["user-agent"] = "writ-test"
		req.Attributes.Request.Http.Headers["authorization"] = "Bearer secret-token"
		resp, err := client.Check(sctx, req)
		if err != nil || code.Code(resp.GetStatus().GetCode()) != c.want {
			t.Fatalf("check %s: %v %v, want %v", c.path, resp.GetStatus(), err, c.want)
		}
		result := "allow"
		if c.want != code.Code_OK {
			result = "deny"
		}
		waitAudit(t, w.dbURL, "the enforcer's decision on "+c.path,
			"kind = 'request' AND resource = $1 AND result = $2 AND principal = $3 AND starts_with(source, $4)"+
				" AND attributes->'headers'->>'user-agent' = 'writ-test' AND attributes::text NOT LIKE '%secret-token%'",
			c.path, result, c.src, enforcerID.String()+"#")
	}
	waitAudit(t, w.dbURL, "the enforcer's policy load",
		"kind = 'policy_change' AND action = 'reload' AND result = 'ok' AND starts_with(resource, 'dir:') AND starts_with(source, $1)",
		enforcerID.String()+"#")
	if out, code := w.writ(t, "audit", "verify"); code != 0 || !strings.Contains(out, "all chains intact") {
		t.Fatalf("audit verify: %d %s", code, out)
	}
}

// openPool connects to a test database, closed at cleanup.
func openPool(t testing.TB, dbURL string) *pgxpool.Pool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}
