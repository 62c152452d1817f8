package test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/store/pgtest"
)

const meshAuthz = `apiVersion: writ.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: greeter, namespace: demo}
spec:
  service: greeter
  package: writ.authz
  mode: enforce
  allow:
    - principals: ["spiffe://example.org/ns/demo/sa/client"]
`

// TestChangesAreAuditEvents: against a real writd, every configuration
// change (apply, delete, rollback), policy change (an AuthorizationPolicy,
// a decision-API policy reload that succeeds and one that fails), every
// issuance-log row (a node's join-token login, its node SVID, writd's own
// SVIDs and intermediate, a refused attestation) and every admin call is
// an audit event, exactly once, and every chain verifies.
func TestChangesAreAuditEvents(t *testing.T) {
	root := repoRoot(t)
	pdir := t.TempDir()
	for _, f := range []string{"authzen.rego", "data.json"} {
		b, err := os.ReadFile(filepath.Join(root, "api", "decision", "testdata", "policy", f))
		if err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(pdir, f), string(b))
	}
	admin := t.TempDir()
	rego, err := os.ReadFile(filepath.Join(root, "policies", "admin", "admin.rego"))
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(admin, "admin.rego"), string(rego))
	write(t, filepath.Join(admin, "data.json"), decisionGrants)
	w := startWritd(t, writdOptions{listenDecision: freeAddr(t), extra: fmt.Sprintf("decision:\n  policy_dir: %s\n  admin_policy_dir: %s\n", pdir, admin)})
	must := func(args ...string) {
		t.Helper()
		if out, code := w.writ(t, args...); code != 0 {
			t.Fatalf("writ %s: %d %s", strings.Join(args, " "), code, out)
		}
	}
	mdir := t.TempDir()
	write(t, filepath.Join(mdir, "1-service.yaml"), meshService)
	write(t, filepath.Join(mdir, "2-route.yaml"), meshRoute)
	write(t, filepath.Join(mdir, "3-authz.yaml"), meshAuthz)
	must("apply", "-f", mdir)
	must("apply", "-f", mdir) // unchanged: no event
	must("delete", "route", "greeter", "-n", "demo")
	must("rollback", "route", "greeter", "-n", "demo", "--to", "1")

	// A node logs in with a join token and gets its node SVID (a
	// writ-proxy agent); a second attestation with a bogus token is
	// refused.
	startProxyProc(t, w, "n1")
	bundle, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("example.org"), []byte(w.get(t, "/bundle")))
	if err != nil {
		t.Fatal(err)
	}
	cp := authority.ControlPlaneID(spiffeid.RequireTrustDomainFromString("example.org"))
	conn, err := grpc.NewClient(w.grpc, grpc.WithTransportCredentials(credentials.NewTLS(tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(cp)))))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, csr := authoritytest.CSR(t, spiffeid.ID{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := nodeapi.NewNodeClient(conn).Attest(ctx, &nodeapi.AttestRequest{JoinToken: "bogus-token", Csr: csr}); err == nil {
		t.Fatal("attest with a bogus token succeeded")
	}

	// A broken decision policy is refused at reload; the event says so.
	write(t, filepath.Join(pdir, "broken.rego"), "package writ.authzen\n\nallow if {\n  input.x ==\n}\n")
	waitUntil(t, 30*time.Second, "the refused reload's event", func() bool {
		return countAudit(t, w.dbURL, "kind = 'policy_change' AND result = 'error'") > 0
	})

	exactly := func(want int, what, where string, args ...any) {
		t.Helper()
		if n := countAudit(t, w.dbURL, where, args...); n != want {
			t.Errorf("%s: %d events, want %d", what, n, want)
		}
	}
	for _, c := range []struct {
		kind, action, resource, result string
	}{
		{"config_change", "apply", "Service/demo/greeter", "created"},
		{"config_change", "apply", "Route/demo/greeter", "created"},
		{"policy_change", "apply", "AuthorizationPolicy/demo/greeter", "created"},
		{"config_change", "delete", "Route/demo/greeter", "deleted"},
		{"config_change", "rollback", "Route/demo/greeter", "created"},
	} {
		exactly(1, c.action+" "+c.resource, "kind = $1 AND action = $2 AND resource = $3 AND result = $4 AND principal LIKE 'uid:%'",
			c.kind, c.action, c.resource, c.result)
	}
	exactly(5, "mesh changes", "kind IN ('config_change', 'policy_change') AND action IN ('apply', 'delete', 'rollback')")
	exactly(1, "decision policy loaded", "kind = 'policy_change' AND action = 'reload' AND result = 'ok' AND resource = $1", "decision-api:"+pdir)
	exactly(1, "decision policy refused", "kind = 'policy_change' AND action = 'reload' AND result = 'error' AND reason LIKE '%broken.rego%'")
	exactly(1, "join-token login", "kind = 'login' AND action = 'join-token' AND destination = 'spiffe://example.org/node/n1'")
	exactly(1, "node SVID", "kind = 'cert_issued' AND action = 'node-svid' AND destination = 'spiffe://example.org/node/n1'")
	exactly(1, "refused attestation", "kind = 'cert_refused' AND action = 'join-token'")
	exactly(1, "intermediate", "kind = 'cert_issued' AND action = 'intermediate'")

	// Every issuance-log row is an audit event; every admin_events row
	// too (admin calls are recorded after the answer: wait for the last).
	pool := openPool(t, w.dbURL)
	var issuances, adminCalls int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM issuance_log").Scan(&issuances); err != nil {
		t.Fatal(err)
	}
	exactly(issuances, "issuance-log rows", "kind IN ('cert_issued', 'cert_renewed', 'cert_refused', 'login')")
	if out, code := w.writ(t, "audit", "verify"); code != 0 || !strings.Contains(out, "all chains intact") {
		t.Fatalf("audit verify: %d %s", code, out)
	}
	waitUntil(t, 10*time.Second, "the admin calls' events", func() bool {
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM admin_events").Scan(&adminCalls); err != nil {
			t.Fatal(err)
		}
		return countAudit(t, w.dbURL, "kind = 'admin_call'") == adminCalls
	})
	exactly(1, "token create call", "kind = 'admin_call' AND action = 'POST' AND resource = '/v1/join-tokens' AND result = 'ok'")
}

// TestAuditCertRenewal: a node renews its node SVID over mTLS on the
// node API (as an agent does at half life); the renewal is a
// cert_renewed event in PostgreSQL, exactly once, carrying the new
// certificate's serial and expiry, in the same transaction as its
// issuance-log row, and the chain verifies.
func TestAuditCertRenewal(t *testing.T) {
	dbURL := pgtest.URL(t)
	w := newAuditWritd(t, dbURL)
	svid := w.attest(t, "renewer")
	node := "spiffe://example.org/node/renewer"
	key, csr := authoritytest.CSR(t, spiffeid.ID{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := nodeapi.NewNodeClient(w.dialCollector(t, svid)).RenewNode(ctx, &nodeapi.RenewNodeRequest{Csr: csr})
	if err != nil {
		t.Fatalf("renew node: %v", err)
	}
	leaf := authoritytest.SVID(t, resp.GetSvid().GetCertChain(), key).Certificates[0]
	if leaf.SerialNumber.Cmp(svid.Certificates[0].SerialNumber) == 0 {
		t.Fatal("the renewal returned the old certificate")
	}
	for _, c := range []struct {
		what, where string
		args        []any
	}{
		{"the renewal", "kind = 'cert_renewed' AND action = 'node-svid' AND result = 'renewed' AND principal = $1 AND destination = $1" +
			" AND resource = $2 AND attributes->>'not_after' = $3",
			[]any{node, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339)}},
		{"the first issuance", "kind = 'cert_issued' AND action = 'node-svid' AND destination = $1 AND resource = $2",
			[]any{node, svid.Certificates[0].SerialNumber.Text(16)}},
	} {
		if n := countAudit(t, dbURL, c.where, c.args...); n != 1 {
			t.Errorf("%s: %d events, want 1", c.what, n)
		}
	}
	var renewedRows int
	if err := openPool(t, dbURL).QueryRow(ctx, "SELECT count(*) FROM issuance_log WHERE outcome = 'renewed'").Scan(&renewedRows); err != nil {
		t.Fatal(err)
	}
	if n := countAudit(t, dbURL, "kind = 'cert_renewed'"); n != renewedRows || n == 0 {
		t.Errorf("%d cert_renewed events for %d renewed issuance-log rows", n, renewedRows)
	}
	if out, code := w.writ(t, "audit", "verify"); code != 0 || !strings.Contains(out, "all chains intact") {
		t.Fatalf("audit verify: %d %s", code, out)
	}
}
