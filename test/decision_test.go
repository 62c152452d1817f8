package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/authority/svidtls"
)

// decisionGrants lets the apps namespace use AuthZEN and the writ/ data
// paths; everyone else is refused.
const decisionGrants = `{"writ": {"decision_api": {"grants": [
	{"callers": ["spiffe://example.org/ns/apps/sa/*"], "apis": ["authzen"]},
	{"callers": ["spiffe://example.org/ns/apps/sa/*"], "apis": ["data"], "paths": ["writ/**"]}
]}}}`

// TestDecisionAPIOnWritd drives a real writd's decision API the way
// workloads do: SVIDs and a JWT-SVID obtained over the node API, then
// AuthZEN and data API requests over TLS.
func TestDecisionAPIOnWritd(t *testing.T) {
	root := repoRoot(t)
	admin := t.TempDir()
	rego, err := os.ReadFile(filepath.Join(root, "policies", "admin", "admin.rego"))
	if err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string][]byte{"admin.rego": rego, "data.json": []byte(decisionGrants)} {
		if err := os.WriteFile(filepath.Join(admin, name), body, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	const aud = "spiffe://example.org/writ/decision-api"
	addr := freeAddr(t)
	w := startWritd(t, writdOptions{listenDecision: addr, extra: fmt.Sprintf(
		"decision:\n  policy_dir: %s\n  admin_policy_dir: %s\n  jwt_audiences: [%q]\n",
		filepath.Join(root, "api", "decision", "testdata", "policy"), admin, aud)})

	// A node joins with a token and gets SVIDs and a JWT-SVID for the
	// workloads registered under it.
	out, code := w.writ(t, "token", "create", "--spiffe-id", "spiffe://example.org/node/n1", "--ttl", "5m")
	tok := regexp.MustCompile(`Token: (\S+)`).FindStringSubmatch(out)
	if code != 0 || tok == nil {
		t.Fatalf("token create: %d %s", code, out)
	}
	web := spiffeid.RequireFromString("spiffe://example.org/ns/apps/sa/web")
	guest := spiffeid.RequireFromString("spiffe://example.org/ns/guest/sa/visitor")
	for i, id := range []spiffeid.ID{web, guest} {
		if out, code := w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/n1", "--spiffe-id", id.String(), "--selector", fmt.Sprintf("unix:uid:%d", 1000+i)); code != 0 {
			t.Fatalf("entry create: %d %s", code, out)
		}
	}
	bundle, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("example.org"), []byte(w.get(t, "/bundle")))
	if err != nil {
		t.Fatal(err)
	}
	cp := authority.ControlPlaneID(spiffeid.RequireTrustDomainFromString("example.org"))
	ctx := context.Background()
	dial := func(cfg *credentials.TransportCredentials) nodeapi.NodeClient {
		conn, err := grpc.NewClient(w.grpc, grpc.WithTransportCredentials(*cfg))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return nodeapi.NewNodeClient(conn)
	}
	anonCreds := credentials.NewTLS(tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(cp)))
	key, csr := authoritytest.CSR(t, spiffeid.ID{})
	att, err := dial(&anonCreds).Attest(ctx, &nodeapi.AttestRequest{JoinToken: tok[1], Csr: csr})
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	nodeSVID := authoritytest.SVID(t, att.GetSvid().GetCertChain(), key)
	nodeCreds := credentials.NewTLS(tlsconfig.MTLSClientConfig(nodeSVID, bundle, tlsconfig.AuthorizeID(cp)))
	node := dial(&nodeCreds)
	entries, err := node.FetchEntries(ctx, &nodeapi.FetchEntriesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	entryOf := map[string]string{}
	for _, e := range entries.GetEntries() {
		entryOf[e.GetSpiffeId()] = e.GetId()
	}
	svidOf := func(id spiffeid.ID) *x509svid.SVID {
		key, csr := authoritytest.CSR(t, id)
		resp, err := node.SignX509SVIDs(ctx, &nodeapi.SignX509SVIDsRequest{Csrs: []*nodeapi.CSR{{EntryId: entryOf[id.String()], Csr: csr}}})
		if err != nil || len(resp.GetResults()) != 1 || resp.GetResults()[0].GetError() != "" {
			t.Fatalf("sign %s: %v %v", id, err, resp)
		}
		return authoritytest.SVID(t, resp.GetResults()[0].GetSvid().GetCertChain(), key)
	}
	minted, err := node.MintJWTSVID(ctx, &nodeapi.MintJWTSVIDRequest{EntryId: entryOf[web.String()], Audience: []string{aud}})
	if err != nil {
		t.Fatalf("mint jwt-svid: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(minted.GetToken(), bundle, []string{aud}); err != nil {
		t.Fatalf("minted token does not validate: %v", err)
	}

	client := func(svid *x509svid.SVID) *http.Client {
		var src x509svid.Source
		if svid != nil {
			src = svid
		}
		return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig: svidtls.ClientConfig(src, bundle, svidtls.AuthorizeID(cp), nil)}}
	}
	call := func(c *http.Client, method, path, body, bearer string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, "https://"+addr+path, bytes.NewReader([]byte(body)))
		if err != nil {
			t.Fatal(err)
		}
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	const eval = `{"subject": {"type": "user", "id": "alice@example.com"}, "resource": {"type": "document", "id": "1"}, "action": {"name": "can_edit"}}`

	// A caller with an X.509 SVID: AuthZEN.
	if status, body := call(client(svidOf(web)), "POST", "/access/v1/evaluation", eval, ""); status != 200 || body != `{"decision":true}` {
		t.Errorf("SVID caller: %d %s", status, body)
	}
	// A caller with a JWT-SVID and no certificate: the data API.
	status, body := call(client(nil), "POST", "/v1/data/writ/authzen/allow", `{"input": `+eval+`}`, minted.GetToken())
	var dr struct {
		Result     *bool  `json:"result"`
		DecisionID string `json:"decision_id"`
	}
	if err := json.Unmarshal([]byte(body), &dr); status != 200 || err != nil || dr.Result == nil || !*dr.Result || dr.DecisionID == "" {
		t.Errorf("JWT-SVID caller: %d %s", status, body)
	}
	// Authenticated, but not granted by the admin policy.
	if status, body := call(client(svidOf(guest)), "POST", "/access/v1/evaluation", eval, ""); status != 403 {
		t.Errorf("guest: %d %s, want 403", status, body)
	}
	// No credentials.
	if status, body := call(client(nil), "POST", "/access/v1/evaluation", eval, ""); status != 401 {
		t.Errorf("anonymous: %d %s, want 401", status, body)
	}
	if status, body := call(client(nil), "GET", "/.well-known/authzen-configuration", "", ""); status != 200 || !strings.Contains(body, `"access_evaluations_endpoint":"https://`+addr+`/access/v1/evaluations"`) {
		t.Errorf("metadata: %d %s", status, body)
	}
	if m := w.get(t, "/metrics"); !strings.Contains(m, `writ_decision_api_decisions_total{api="authzen",result="allow"} 1`) ||
		!strings.Contains(m, `writ_decision_api_decisions_total{api="data",result="defined"} 1`) {
		t.Errorf("/metrics lacks the decisions:\n%s", grepLines(m, "writ_decision_api"))
	}
	// Every answer and refusal is a row in PostgreSQL, written before
	// the answer was sent, once each, in an intact chain.
	for _, want := range []struct{ result, caller string }{
		{"allow", web.String()}, {"defined", web.String()}, {"forbidden", guest.String()},
	} {
		if n := countAudit(t, w.dbURL, "kind = 'decision_api' AND result = $1 AND principal = $2", want.result, want.caller); n != 1 {
			t.Errorf("%d decision_api rows with result %s by %s, want 1", n, want.result, want.caller)
		}
	}
	if out, code := w.writ(t, "audit", "verify"); code != 0 || !strings.Contains(out, "all chains intact") {
		t.Errorf("audit verify: %d %s", code, out)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
