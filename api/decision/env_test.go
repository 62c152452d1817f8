package decision_test

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/writmesh/writ/api/decision"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/policy"
)

// Test callers. The admin policy of the tests grants the apps namespace
// AuthZEN and the writ/ data paths, and ops/admin everything.
var (
	appID   = spiffeid.RequireFromString("spiffe://example.org/ns/apps/sa/web")
	opsID   = spiffeid.RequireFromString("spiffe://example.org/ns/ops/sa/admin")
	guestID = spiffeid.RequireFromString("spiffe://example.org/ns/guest/sa/visitor")
)

const testAudience = "spiffe://example.org/writ/decision-api"

const testGrants = `{"writ": {"decision_api": {"grants": [
	{"callers": ["spiffe://example.org/ns/apps/sa/*"], "apis": ["authzen"]},
	{"callers": ["spiffe://example.org/ns/apps/sa/*"], "apis": ["data"], "paths": ["writ/**"]},
	{"callers": ["spiffe://example.org/ns/ops/sa/admin"], "apis": ["authzen", "data"], "paths": ["**"]},
	{"callers": ["spiffe://example.org/ns/writ-system/sa/*"], "apis": ["bundles"], "paths": ["mesh"]}
]}}}`

// recordingSink keeps records and fails while err is set.
type recordingSink struct {
	mu   sync.Mutex
	recs []decision.Record
	err  error
}

func (s *recordingSink) Record(_ context.Context, r decision.Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.recs = append(s.recs, r)
	return nil
}

func (s *recordingSink) setErr(err error) {
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
}

func (s *recordingSink) records() []decision.Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]decision.Record(nil), s.recs...)
}

// env is a decision API served over real TLS by a test authority's SVIDs.
type env struct {
	t        testing.TB
	auth     *authoritytest.Env
	url      string
	api      http.Handler
	admin    *policy.Engine
	adminDir string
	sink     *recordingSink
	reg      *prometheus.Registry
	serverID spiffeid.ID
}

// batchSink is a recordingSink that takes batches whole.
type batchSink struct {
	*recordingSink
	batches [][]decision.Record
}

func (s *batchSink) RecordBatch(_ context.Context, rs []decision.Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.batches = append(s.batches, rs)
	s.recs = append(s.recs, rs...)
	return nil
}

type envOptions struct {
	// sink, if set, replaces the env's recordingSink as the API's sink.
	sink        decision.Sink
	evalTimeout time.Duration
	maxBody     int64
	// svidtls serves with svidtls.ServerConfig (client SVID required), as
	// writ-enforcer may, instead of decision.TLSConfig.
	svidtls bool
	// bundles, if set, is the API's bundle service.
	bundles http.Handler
	// policyDir replaces testdata/policy as the API's policy.
	policyDir string
}

// adminDir is the shipped admin policy with the tests' grants.
func adminDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	rego, err := os.ReadFile(filepath.Join("..", "..", "policies", "admin", "admin.rego"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "admin.rego"), rego, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "data.json"), []byte(testGrants), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func newEnv(t testing.TB, o envOptions) *env {
	t.Helper()
	ctx := context.Background()
	a := authoritytest.Start(t, authoritytest.Options{})
	engine, err := policy.NewEngine(ctx, decision.EngineOptions(cmp.Or(o.policyDir, "testdata/policy"), ""))
	if err != nil {
		t.Fatal(err)
	}
	adir := adminDir(t)
	admin, err := policy.NewEngine(ctx, decision.AdminEngineOptions(adir))
	if err != nil {
		t.Fatal(err)
	}
	bundle := a.Bundle(t)
	sink := &recordingSink{}
	reg := prometheus.NewRegistry()
	api, err := decision.New(decision.Options{
		Engine: engine, Admin: admin, Sink: cmp.Or[decision.Sink](o.sink, sink),
		X509Bundles: bundle, JWTBundles: bundle, Audience: []string{testAudience},
		MaxBodyBytes: o.maxBody, EvalTimeout: o.evalTimeout,
		Metrics: reg, Clock: a.Clock, Bundles: o.bundles,
	})
	if err != nil {
		t.Fatal(err)
	}
	serverID := spiffeid.RequireFromString("spiffe://example.org/writ/decision-api")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: api, ReadHeaderTimeout: 10 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	tcfg := decision.TLSConfig(issue(t, a, serverID), bundle, a.Clock)
	if o.svidtls {
		tcfg = svidtls.ServerConfig(issue(t, a, serverID), bundle, svidtls.AuthorizeMemberOf(authoritytest.TrustDomain), a.Clock)
	}
	tl := tls.NewListener(l, tcfg)
	done := make(chan struct{})
	go func() { _ = hs.Serve(tl); close(done) }()
	t.Cleanup(func() { _ = hs.Close(); <-done })
	return &env{t: t, api: api, admin: admin, adminDir: adir, auth: a, url: "https://" + l.Addr().String(), sink: sink, reg: reg, serverID: serverID}
}

// issue signs an X.509 SVID for id with the test authority.
func issue(t testing.TB, a *authoritytest.Env, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key, der := authoritytest.CSR(t, id)
	csr, err := authority.ParseCSR(der)
	if err != nil {
		t.Fatal(err)
	}
	svid, err := a.CA.SignX509SVID(context.Background(), authority.X509Request{CSR: csr, ID: id})
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: svid.Chain, PrivateKey: key}
}

// token signs a JWT-SVID for id.
func (e *env) token(id spiffeid.ID, aud string) string {
	e.t.Helper()
	tok, err := e.auth.CA.SignJWTSVID(context.Background(), id, []string{aud}, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	return tok.Token
}

// client is an HTTPS client that verifies the server's SVID and presents
// svid when it is not nil.
func (e *env) client(svid *x509svid.SVID) *http.Client {
	var src x509svid.Source
	if svid != nil {
		src = svid
	}
	cfg := svidtls.ClientConfig(src, e.auth.Bundle(e.t), svidtls.AuthorizeID(e.serverID), e.auth.Clock)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 30 * time.Second}
}

// mtls is a client with an X.509 SVID for id.
func (e *env) mtls(id spiffeid.ID) *http.Client { return e.client(issue(e.t, e.auth, id)) }

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("response %d is not a JSON object: %v: %s", r.status, err, r.body)
	}
	return m
}

// do sends a request; bearer, if set, goes in Authorization.
func (e *env) do(c *http.Client, method, path, body, bearer string, header ...string) response {
	e.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = bytes.NewReader([]byte(body))
	}
	req, err := http.NewRequest(method, e.url+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: b}
}

// canonical re-encodes JSON so that two documents compare as text.
func canonical(t *testing.T, s string) string {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("bad JSON %q: %v", s, err)
	}
	b, _ := json.Marshal(v)
	return string(b)
}

var errSinkDown = errors.New("audit spool full")
