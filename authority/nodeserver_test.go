package authority_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/nodeapi"
)

func issuanceOutcomes(t *testing.T, env *authoritytest.Env) []string {
	t.Helper()
	rows, err := env.Pool.Query(context.Background(), `SELECT kind || ' ' || outcome FROM issuance_log WHERE kind <> 'intermediate' AND caller IS DISTINCT FROM 'writd' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	return out
}

func wantCode(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), msg) {
		t.Fatalf("err = %v, want %v containing %q", err, code, msg)
	}
}

func TestNodeAttestationAndWorkloadSigning(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	ctx := context.Background()
	node := env.Attest(t, "n1")
	if got, want := node.ID.String(), "spiffe://example.org/node/n1"; got != want {
		t.Fatalf("node id = %s, want %s", got, want)
	}
	bundle := env.Bundle(t)
	if _, _, err := x509svid.Verify(node.Certificates, bundle); err != nil {
		t.Fatalf("node svid does not verify: %v", err)
	}

	mine, err := env.Registry.CreateEntry(ctx, authority.EntryInput{SPIFFEID: "spiffe://example.org/ns/default/sa/web", ParentID: "spiffe://example.org/node/n1", Selectors: []string{"unix:uid:1000"}, X509TTL: 20 * time.Minute}, "test")
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := env.Registry.CreateEntry(ctx, authority.EntryInput{SPIFFEID: "spiffe://example.org/ns/default/sa/db", ParentID: "spiffe://example.org/node/n2", Selectors: []string{"unix:uid:1000"}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	c := env.Dial(t, node)
	fe, err := c.FetchEntries(ctx, &nodeapi.FetchEntriesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(fe.GetEntries()) != 1 || fe.GetEntries()[0].GetId() != mine.ID {
		t.Fatalf("entries = %v, want only %s", fe.GetEntries(), mine.ID)
	}
	if len(fe.GetBundle().GetSpiffeBundle()) == 0 {
		t.Fatal("no bundle with the entries")
	}

	webKey, webCSR := authoritytest.CSR(t, spiffeid.ID{})
	_, dbCSR := authoritytest.CSR(t, spiffeid.ID{})
	_, lyingCSR := authoritytest.CSR(t, spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/admin"))
	resp, err := c.SignX509SVIDs(ctx, &nodeapi.SignX509SVIDsRequest{Csrs: []*nodeapi.CSR{
		{EntryId: mine.ID, Csr: webCSR},
		{EntryId: theirs.ID, Csr: dbCSR},
		{EntryId: mine.ID, Csr: lyingCSR},
		{EntryId: mine.ID, Csr: []byte("garbage")},
	}})
	if err != nil {
		t.Fatal(err)
	}
	res := resp.GetResults()
	if len(res) != 4 {
		t.Fatalf("results = %d, want 4", len(res))
	}
	if res[0].GetError() != "" {
		t.Fatalf("own entry refused: %s", res[0].GetError())
	}
	web := authoritytest.SVID(t, res[0].GetSvid().GetCertChain(), webKey)
	if got, want := web.ID.String(), "spiffe://example.org/ns/default/sa/web"; got != want {
		t.Fatalf("svid id = %s, want %s", got, want)
	}
	if _, _, err := x509svid.Verify(web.Certificates, bundle); err != nil {
		t.Fatalf("workload svid does not verify: %v", err)
	}
	if life := web.Certificates[0].NotAfter.Sub(env.Clock.Now()); life > 20*time.Minute+time.Second || life < 19*time.Minute {
		t.Fatalf("svid lifetime %v, want the entry's 20m", life)
	}
	if !strings.Contains(res[1].GetError(), "not registered to node") {
		t.Fatalf("another node's entry: %q", res[1].GetError())
	}
	if res[2].GetError() == "" || res[3].GetError() == "" {
		t.Fatalf("mismatched and garbage CSRs were signed: %q %q", res[2].GetError(), res[3].GetError())
	}

	// JWT-SVIDs.
	jwt, err := c.MintJWTSVID(ctx, &nodeapi.MintJWTSVIDRequest{EntryId: mine.ID, Audience: []string{"spiffe://example.org/ns/default/sa/db"}})
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := jwtsvid.ParseAndValidate(jwt.GetToken(), bundle, []string{"spiffe://example.org/ns/default/sa/db"})
	if err != nil {
		t.Fatalf("jwt does not validate: %v", err)
	}
	if parsed.ID.String() != mine.SPIFFEID.String() {
		t.Fatalf("jwt subject = %s", parsed.ID)
	}
	_, err = c.MintJWTSVID(ctx, &nodeapi.MintJWTSVIDRequest{EntryId: theirs.ID, Audience: []string{"x"}})
	wantCode(t, err, codes.PermissionDenied, "not registered to node")
	_, err = c.MintJWTSVID(ctx, &nodeapi.MintJWTSVIDRequest{EntryId: mine.ID})
	wantCode(t, err, codes.InvalidArgument, "audience")

	// Renewal of the node SVID.
	nodeKey, nodeCSR := authoritytest.CSR(t, node.ID)
	rn, err := c.RenewNode(ctx, &nodeapi.RenewNodeRequest{Csr: nodeCSR})
	if err != nil {
		t.Fatal(err)
	}
	renewed := authoritytest.SVID(t, rn.GetSvid().GetCertChain(), nodeKey)
	if renewed.Certificates[0].SerialNumber.Cmp(node.Certificates[0].SerialNumber) == 0 {
		t.Fatal("renewal returned the same certificate")
	}

	got := strings.Join(issuanceOutcomes(t, env), ", ")
	want := "join-token used, node-svid issued, x509-svid issued, x509-svid refused, x509-svid refused, x509-svid refused, jwt-svid issued, jwt-svid refused, node-svid renewed"
	if got != want {
		t.Fatalf("issuance log:\n got %s\nwant %s", got, want)
	}
}

func TestAttestRefusals(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	ctx := context.Background()
	c := env.Dial(t, nil)
	tok, err := env.Registry.CreateJoinToken(ctx, "spiffe://example.org/node/n1", time.Minute, "test")
	if err != nil {
		t.Fatal(err)
	}
	_, csr := authoritytest.CSR(t, spiffeid.ID{})
	_, err = c.Attest(ctx, &nodeapi.AttestRequest{JoinToken: "wrong", Csr: csr})
	wantCode(t, err, codes.PermissionDenied, "unknown")
	_, err = c.Attest(ctx, &nodeapi.AttestRequest{JoinToken: tok.Token, Csr: []byte("nope")})
	wantCode(t, err, codes.InvalidArgument, "csr")
	// The bad CSR did not burn the token.
	if _, err := c.Attest(ctx, &nodeapi.AttestRequest{JoinToken: tok.Token, Csr: csr}); err != nil {
		t.Fatalf("attest after a refused CSR: %v", err)
	}
	_, err = c.Attest(ctx, &nodeapi.AttestRequest{JoinToken: tok.Token, Csr: csr})
	wantCode(t, err, codes.PermissionDenied, "already used")
	// A CSR naming another identity is refused.
	tok2, _ := env.Registry.CreateJoinToken(ctx, "spiffe://example.org/node/n2", time.Minute, "test")
	_, lying := authoritytest.CSR(t, spiffeid.RequireFromString("spiffe://example.org/node/n3"))
	_, err = c.Attest(ctx, &nodeapi.AttestRequest{JoinToken: tok2.Token, Csr: lying})
	wantCode(t, err, codes.InvalidArgument, "csr")
	var nodes int
	if err := env.Pool.QueryRow(ctx, `SELECT count(*) FROM nodes`).Scan(&nodes); err != nil {
		t.Fatal(err)
	}
	if nodes != 1 {
		t.Fatalf("nodes = %d, want 1", nodes)
	}
}

func TestNodeCallsNeedANodeSVID(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	ctx := context.Background()
	// No client certificate.
	_, err := env.Dial(t, nil).FetchEntries(ctx, &nodeapi.FetchEntriesRequest{})
	wantCode(t, err, codes.Unauthenticated, "client certificate")

	// A workload's SVID is not a node's.
	node := env.Attest(t, "n1")
	e, err := env.Registry.CreateEntry(ctx, authority.EntryInput{SPIFFEID: "spiffe://example.org/ns/default/sa/web", ParentID: "spiffe://example.org/node/n1", Selectors: []string{"unix:uid:1"}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	key, csr := authoritytest.CSR(t, spiffeid.ID{})
	resp, err := env.Dial(t, node).SignX509SVIDs(ctx, &nodeapi.SignX509SVIDsRequest{Csrs: []*nodeapi.CSR{{EntryId: e.ID, Csr: csr}}})
	if err != nil || resp.GetResults()[0].GetError() != "" {
		t.Fatalf("sign: %v %v", err, resp)
	}
	workload := authoritytest.SVID(t, resp.GetResults()[0].GetSvid().GetCertChain(), key)
	_, err = env.Dial(t, workload).FetchEntries(ctx, &nodeapi.FetchEntriesRequest{})
	wantCode(t, err, codes.PermissionDenied, "not a node identity")

	// A certificate from another CA does not get through TLS.
	other := authoritytest.Start(t, authoritytest.Options{})
	stranger := other.Attest(t, "n1")
	_, err = env.Dial(t, stranger).FetchEntries(ctx, &nodeapi.FetchEntriesRequest{})
	if err == nil {
		t.Fatal("a node SVID from another CA was accepted")
	}
	// A banned node is refused.
	if _, err := env.Pool.Exec(ctx, `UPDATE nodes SET banned = true WHERE spiffe_id = $1`, node.ID.String()); err != nil {
		t.Fatal(err)
	}
	_, err = env.Dial(t, node).FetchEntries(ctx, &nodeapi.FetchEntriesRequest{})
	wantCode(t, err, codes.PermissionDenied, "banned")
}
