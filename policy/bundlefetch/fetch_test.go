package bundlefetch

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/writmesh/writ/policy"
)

// TestFetcher: the first fetch stores the bundle, polls send
// If-None-Match and reload nothing on 304, a new bundle is stored and
// loaded, and a server error keeps the running policy.
func TestFetcher(t *testing.T) {
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
	f := New(Options{URL: srv.URL, Dir: t.TempDir(), Interval: time.Second, Clock: clock, Log: slog.New(slog.DiscardHandler)})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := f.First(ctx, 0); err != nil {
		t.Fatal(err)
	}
	e, err := policy.NewEngine(ctx, policy.Options{Bundle: f.File(), CacheSize: -1})
	if err != nil {
		t.Fatal(err)
	}
	first := e.Revision()

	changed, err := f.Fetch(ctx)
	if err != nil || changed {
		t.Fatalf("unchanged poll: changed %v, err %v", changed, err)
	}
	mu.Lock()
	if conditional != 1 || full != 1 {
		t.Fatalf("%d conditional and %d full answers, want 1 and 1", conditional, full)
	}
	cur = write("package envoy.authz\n\ndefault allow := true\n")
	mu.Unlock()
	changed, err = f.Fetch(ctx)
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
	if _, err := f.Fetch(ctx); err == nil {
		t.Fatal("a 503 was not reported")
	}
	if bs, err := os.ReadFile(f.File()); err != nil || len(bs) == 0 {
		t.Fatalf("the stored bundle is gone after a failed poll: %v", err)
	}
}

// TestFirstRetries: the first fetch waits out a bundle server that is not
// up yet, pausing on the clock, and returns once a bundle is stored.
func TestFirstRetries(t *testing.T) {
	var mu sync.Mutex
	calls := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls < 3 {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("bundle"))
	}))
	defer srv.Close()
	clock := clockwork.NewFakeClock()
	f := New(Options{URL: srv.URL, Dir: t.TempDir(), Interval: time.Second, Clock: clock})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- f.First(ctx, 0) }()
	for _, pause := range []time.Duration{time.Second, 2 * time.Second} {
		if err := clock.BlockUntilContext(ctx, 1); err != nil {
			t.Fatal(err)
		}
		clock.Advance(pause)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(f.File()); err != nil || string(b) != "bundle" {
		t.Fatalf("stored %q, %v", b, err)
	}
}

// TestFetchRefuses: an oversized bundle and a redirect store nothing.
func TestFetchRefuses(t *testing.T) {
	big := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := make([]byte, 1<<20)
		for range MaxBundleBytes>>20 + 1 {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	defer big.Close()
	redirect := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, big.URL, http.StatusFound)
	}))
	defer redirect.Close()
	for name, tt := range map[string]struct{ url, want string }{
		"too large": {big.URL, "larger than"},
		"redirect":  {redirect.URL, "302"},
	} {
		f := New(Options{URL: tt.url, Dir: t.TempDir(), Interval: time.Second})
		changed, err := f.Fetch(context.Background())
		if err == nil || !strings.Contains(err.Error(), tt.want) || changed {
			t.Errorf("%s: changed %v, err %v; want an error containing %q", name, changed, err, tt.want)
		}
		if _, err := os.Stat(f.File()); !os.IsNotExist(err) {
			t.Errorf("%s: a bundle was stored", name)
		}
	}
	if _, err := CheckURL("ftp://writd/bundles/mesh"); err == nil {
		t.Error("an ftp URL was accepted")
	}
}
