package test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/genproto/googleapis/rpc/code"

	"github.com/writmesh/writ/compliance"
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
	// The mTLS facts: over mTLS, with the frontend SVID's expiry (an
	// hour by default) from the handshake.
	var notAfter time.Time
	if err := openPool(t, w.dbURL).QueryRow(context.Background(), "SELECT (attributes->>'peer_cert_not_after')::timestamptz FROM audit_events"+
		" WHERE kind = 'request' AND resource = $1 AND attributes->'mtls' = 'true'::jsonb", path).Scan(&notAfter); err != nil {
		t.Fatalf("the decision's mTLS facts: %v", err)
	}
	if now := time.Now(); !notAfter.After(now) || notAfter.After(now.Add(2*time.Hour)) {
		t.Fatalf("peer_cert_not_after %v, want within the frontend SVID's lifetime from now", notAfter)
	}
	r := reportJSON(t, w, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	if m, x := r.Sections.MTLS, r.Sections.Certificates.ExpiredInUse; m.Requests != 1 || m.MTLS != 1 || m.Plaintext != 0 ||
		x.Method != "recorded" || x.Recorded != 1 || len(x.Findings) != 0 {
		t.Fatalf("report: mtls %+v, expired in use %+v", m, x)
	}
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
	// Envoy's include_peer_certificate sends the caller's certificate,
	// URL-encoded PEM, beside its principal; the enforcer records its
	// expiry. The intruder's has expired (Envoy checked it when it was
	// valid; the enforcer does not judge certificates, it records them).
	valid, expired := selfSigned(t, time.Now().Add(time.Hour)), selfSigned(t, time.Now().Add(-time.Hour))
	for _, c := range []struct {
		src, method, path string
		cert              *x509.Certificate
		want              code.Code
	}{
		{clientID.String(), "GET", fmt.Sprintf("/ok/%d", stamp), valid, code.Code_OK},
		{"spiffe://example.org/ns/demo/sa/intruder", "GET", fmt.Sprintf("/no/%d", stamp), expired, code.Code_PERMISSION_DENIED},
		{"", "GET", fmt.Sprintf("/plain/%d", stamp), nil, code.Code_PERMISSION_DENIED},
	} {
		req := checkReq(c.src, serverID.String(), c.method, c.path)
		mtls, notAfter := "false", "IS NULL"
		if c.cert != nil {
			req.Attributes.Source.Certificate = strings.ReplaceAll(url.QueryEscape(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.cert.Raw}))), "+", "%20")
			mtls, notAfter = "true", "= '"+c.cert.NotAfter.UTC().Format(time.RFC3339)+"'"
		}
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
				" AND attributes->'headers'->>'user-agent' = 'writ-test' AND attributes::text NOT LIKE '%secret-token%'"+
				" AND attributes->'mtls' = '"+mtls+"'::jsonb AND attributes->>'peer_cert_not_after' "+notAfter,
			c.path, result, c.src, enforcerID.String()+"#")
	}
	// The report over them: two of three over mTLS, one plaintext
	// attempt, the intruder's expired certificate found from what was
	// recorded.
	r := reportJSON(t, w, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	m, x := r.Sections.MTLS, r.Sections.Certificates.ExpiredInUse
	if m.Requests != 3 || m.MTLS != 2 || m.Plaintext != 1 || len(m.Attempts) != 1 || m.Attempts[0].Source != "" {
		t.Errorf("report mTLS coverage: %+v", m)
	}
	if x.Method != "recorded" || x.Checked != 2 || x.Recorded != 2 || len(x.Findings) != 1 ||
		x.Findings[0].Principal != "spiffe://example.org/ns/demo/sa/intruder" || x.Findings[0].Basis != "recorded" || x.Findings[0].Requests != 1 {
		t.Errorf("report expired certificates in use: %+v", x)
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

// reportJSON runs `writ report generate --format json` over [from, to).
func reportJSON(t *testing.T, w *writd, from, to time.Time) compliance.Report {
	t.Helper()
	out := filepath.Join(t.TempDir(), "report.json")
	if text, code := w.writ(t, "report", "generate", "--from", from.UTC().Format(time.RFC3339), "--to", to.UTC().Format(time.RFC3339),
		"--format", "json", "-o", out); code != 0 {
		t.Fatalf("report generate: exit %d\n%s", code, text)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var r compliance.Report
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// selfSigned is a throwaway certificate expiring at notAfter.
func selfSigned(t *testing.T, notAfter time.Time) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	notAfter = notAfter.Truncate(time.Second)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(notAfter.UnixNano()), NotBefore: notAfter.Add(-2 * time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
