package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/writmesh/writ/config"
)

const bundlePolicy = `package envoy.authz

default allow := false

allow if input.attributes.source.principal in data.callers
`

func writeFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestBundleService: the directory is served with an ETag, If-None-Match
// gets 304, an edit gets a new bundle at the next poll, and a broken edit
// keeps the last good bundle.
func TestBundleService(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "authz.rego"), bundlePolicy)
	writeFile(t, filepath.Join(dir, "data.json"), `{"callers": ["spiffe://td/ns/a/sa/x"]}`)
	clock := clockwork.NewFakeClock()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := newBundleService(ctx, config.Policy{Dir: dir, BundleName: "mesh", PollInterval: config.Duration(time.Second)},
		clock, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	polled := make(chan struct{})
	s.polled = func() { polled <- struct{}{} }
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	mux := http.NewServeMux()
	mux.Handle("GET /bundles/{name}", s)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	get := func(path, etag string) (int, string, []byte) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, srv.URL+path, nil)
		if etag != "" {
			req.Header.Set("If-None-Match", etag)
		}
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header.Get("ETag"), b
	}
	code, etag, body := get("/bundles/mesh", "")
	if code != http.StatusOK || etag == "" || len(body) == 0 {
		t.Fatalf("GET: %d etag %q, %d bytes", code, etag, len(body))
	}
	if code, _, _ := get("/bundles/mesh", etag); code != http.StatusNotModified {
		t.Fatalf("GET with If-None-Match: %d, want 304", code)
	}
	if code, _, _ := get("/bundles/other", ""); code != http.StatusNotFound {
		t.Fatalf("GET unknown bundle: %d, want 404", code)
	}

	// poll advances the clock one interval and waits until the poll has
	// been handled.
	poll := func() {
		t.Helper()
		if err := clock.BlockUntilContext(ctx, 1); err != nil {
			t.Fatal(err)
		}
		clock.Advance(time.Second)
		<-polled
	}
	writeFile(t, filepath.Join(dir, "data.json"), `{"callers": ["spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"]}`)
	poll()
	_, etag2, _ := get("/bundles/mesh", "")
	if code, _, _ := get("/bundles/mesh", etag); code != http.StatusOK || etag2 == etag {
		t.Fatalf("after an edit: %d with old etag %q, new etag %q, want 200 and a new etag", code, etag, etag2)
	}

	writeFile(t, filepath.Join(dir, "broken.rego"), "package envoy.authz\n\nallow if {\n")
	poll()
	if got := testutil.ToFloat64(s.builds.WithLabelValues("rejected")); got != 1 {
		t.Fatalf("%v rejected builds, want 1", got)
	}
	poll() // the same broken content is not rebuilt
	if got := testutil.ToFloat64(s.builds.WithLabelValues("rejected")); got != 1 {
		t.Fatalf("%v rejected builds after another poll, want 1", got)
	}
	if code, _, _ := get("/bundles/mesh", etag2); code != http.StatusNotModified {
		t.Fatalf("after a broken edit: %d, want 304 (the last good bundle)", code)
	}
	if got := s.cur.Load().etag; got != etag2 {
		t.Fatalf("serving %s, want the last good %s", got, etag2)
	}
}

func TestBundleServiceRefusesBrokenStart(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "authz.rego"), "package envoy.authz\n\nallow if {\n")
	_, err := newBundleService(context.Background(), config.Policy{Dir: dir, BundleName: "mesh", PollInterval: config.Duration(time.Second)},
		clockwork.NewFakeClock(), prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "authz.rego:") {
		t.Fatalf("err %v, want one naming authz.rego", err)
	}
}
