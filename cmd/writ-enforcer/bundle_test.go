package main

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/writmesh/writ/policy"
)

// TestBundleFetcher: the first fetch stores the bundle, polls send
// If-None-Match and reload nothing on 304, a new bundle is stored and
// loaded, and a server error keeps the running policy.
func TestBundleFetcher(t *testing.T) {
	src := t.TempDir()
	write := func(body string) *policy.Bundle {
		t.Helper()
		if err := os.WriteFile(filepath.Join(src, "authz.rego"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		b, err := policy.BuildBundle(context.Background(), src, policy.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var mu sync.Mutex
	cur := write("package envoy.authz\n\ndefault allow := false\n")
	fail := false
	var conditional, full int
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if fail {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		etag := `"` + cur.Hash[:16] + `"`
		w.Header().Set("ETag", etag)
		if r.Header.Get("If-None-Match") == etag {
			conditional++
			w.WriteHeader(http.StatusNotModified)
			return
		}
		full++
		_, _ = w.Write(cur.Data)
	}))
	defer srv.Close()

	clock := clockwork.NewFakeClock()
	f := newBundleFetcher(srv.URL, t.TempDir(), time.Second, nil, clock, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := f.first(ctx); err != nil {
		t.Fatal(err)
	}
	e, err := policy.NewEngine(ctx, policy.Options{Bundle: f.file, CacheSize: -1})
	if err != nil {
		t.Fatal(err)
	}
	first := e.Revision()

	changed, err := f.fetch(ctx)
	if err != nil || changed {
		t.Fatalf("unchanged poll: changed %v, err %v", changed, err)
	}
	mu.Lock()
	if conditional != 1 || full != 1 {
		t.Fatalf("%d conditional and %d full answers, want 1 and 1", conditional, full)
	}
	cur = write("package envoy.authz\n\ndefault allow := true\n")
	mu.Unlock()
	changed, err = f.fetch(ctx)
	if err != nil || !changed {
		t.Fatalf("changed poll: changed %v, err %v", changed, err)
	}
	if err := e.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if e.Revision() == first {
		t.Fatal("a new bundle did not change the revision")
	}
	mu.Lock()
	fail = true
	mu.Unlock()
	if _, err := f.fetch(ctx); err == nil {
		t.Fatal("a 503 was not reported")
	}
	if bs, err := os.ReadFile(f.file); err != nil || len(bs) == 0 {
		t.Fatalf("the stored bundle is gone after a failed poll: %v", err)
	}
}
