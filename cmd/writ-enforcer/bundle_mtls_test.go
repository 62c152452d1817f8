package main

import (
	"context"
	"crypto/tls"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
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
	"github.com/writmesh/writ/policy/bundlefetch"
)

func signSVID(t *testing.T, a *authoritytest.Env, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key, der := authoritytest.CSR(t, id)
	csr, err := authority.ParseCSR(der)
	if err != nil {
		t.Fatal(err)
	}
	s, err := a.CA.SignX509SVID(context.Background(), authority.X509Request{CSR: csr, ID: id})
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: s.Chain, PrivateKey: key}
}

// TestBundleFetcherOverMTLS: the fetcher pulls the bundle from the
// decision API's listener (as writd serves it) with the enforcer's SVID;
// a caller the admin policy does not grant gets 403 and stores nothing,
// and a server presenting another SPIFFE ID than expected is refused.
func TestBundleFetcherOverMTLS(t *testing.T) {
	ctx := context.Background()
	a := authoritytest.Start(t, authoritytest.Options{})
	td := authoritytest.TrustDomain
	serverID := spiffeid.RequireFromSegments(td, "writ", "control-plane")
	enforcerID := spiffeid.RequireFromSegments(td, "ns", "writ-system", "sa", "writ-enforcer")
	otherID := spiffeid.RequireFromSegments(td, "ns", "apps", "sa", "web")

	pdir := t.TempDir()
	if err := os.WriteFile(filepath.Join(pdir, "authz.rego"), []byte("package envoy.authz\n\ndefault allow := false\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := policy.BuildBundle(ctx, pdir, policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	adir := t.TempDir()
	rego, err := os.ReadFile(filepath.Join("..", "..", "policies", "admin", "admin.rego"))
	if err != nil {
		t.Fatal(err)
	}
	grants := `{"writ": {"decision_api": {"grants": [{"callers": ["spiffe://` + td.Name() + `/ns/writ-system/sa/*"], "apis": ["bundles"], "paths": ["mesh"]}]}}}`
	for name, body := range map[string]string{"admin.rego": string(rego), "data.json": grants} {
		if err := os.WriteFile(filepath.Join(adir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	engine, err := policy.NewEngine(ctx, policy.Options{Dir: pdir})
	if err != nil {
		t.Fatal(err)
	}
	admin, err := policy.NewEngine(ctx, decision.AdminEngineOptions(adir))
	if err != nil {
		t.Fatal(err)
	}
	bundle := a.Bundle(t)
	api, err := decision.New(decision.Options{
		Engine: engine, Admin: admin, Sink: decision.LogSink{Log: slog.New(slog.DiscardHandler)},
		X509Bundles: bundle, JWTBundles: bundle, Audience: []string{"spiffe://" + td.Name() + "/writ/decision-api"},
		Metrics: prometheus.NewRegistry(), Clock: a.Clock,
		Bundles: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("ETag", `"`+b.Hash[:16]+`"`)
			_, _ = w.Write(b.Data)
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := decision.HTTPServer(api)
	srv.ErrorLog = log.New(io.Discard, "", 0)
	go func() {
		_ = srv.Serve(tls.NewListener(l, decision.TLSConfig(signSVID(t, a, serverID), bundle, a.Clock)))
	}()
	t.Cleanup(func() { _ = srv.Close() })
	url := "https://" + l.Addr().String() + "/bundles/mesh"

	fetch := func(id, server spiffeid.ID) (string, bool, error) {
		dir := t.TempDir()
		cfg := svidtls.ClientConfig(signSVID(t, a, id), bundle, svidtls.AuthorizeID(server), a.Clock)
		f := bundlefetch.New(bundlefetch.Options{URL: url, Dir: dir, Interval: time.Second, TLS: cfg, Clock: a.Clock, Log: slog.New(slog.DiscardHandler)})
		fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		changed, err := f.Fetch(fctx)
		return f.File(), changed, err
	}
	file, changed, err := fetch(enforcerID, serverID)
	if err != nil || !changed {
		t.Fatalf("granted fetch: changed %v, %v", changed, err)
	}
	if got, err := os.ReadFile(file); err != nil || string(got) != string(b.Data) {
		t.Fatalf("stored bundle differs (%v)", err)
	}
	file, changed, err = fetch(otherID, serverID)
	if err == nil || !strings.Contains(err.Error(), "403") || changed {
		t.Fatalf("ungranted fetch: changed %v, err %v; want 403", changed, err)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Fatalf("an ungranted fetch stored a bundle: %v", err)
	}
	if _, _, err := fetch(enforcerID, otherID); err == nil || !strings.Contains(err.Error(), "peer not authorized") {
		t.Fatalf("fetch from a server with another ID: %v, want a refused handshake", err)
	}
}
