package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/writmesh/writ/policy"
)

// Bounds of a bundle download: the engine refuses larger policy sets
// anyway, and a poll must not hang.
const (
	maxBundleBytes = 64 << 20
	fetchTimeout   = 30 * time.Second
	firstFetchWait = 30 * time.Second
)

// bundleFetcher polls an OPA bundle service (writd's GET /bundles/NAME, or
// any server speaking OPA's bundle protocol) with If-None-Match, stores a
// changed bundle in a local file, and asks the engine to reload it. The
// engine compiles and smoke-tests it before any swap, so a bad bundle
// changes nothing. Not safe for concurrent use: one goroutine runs it.
type bundleFetcher struct {
	url      string
	file     string
	interval time.Duration
	clock    clockwork.Clock
	client   *http.Client
	log      *slog.Logger
	etag     string
}

// newBundleFetcher polls url. tlsCfg, if set, is the mTLS client
// configuration of an https URL (the enforcer's SVID, the bundle server's
// expected SPIFFE ID); plain http URLs need none.
func newBundleFetcher(url, dir string, interval time.Duration, tlsCfg *tls.Config, clock clockwork.Clock, log *slog.Logger) *bundleFetcher {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil // a bundle server inside the mesh is reached directly
	tr.TLSClientConfig = tlsCfg
	tr.MaxResponseHeaderBytes = 64 << 10
	return &bundleFetcher{
		url: url, file: filepath.Join(dir, "bundle.tar.gz"), interval: interval, clock: clock, log: log,
		client: &http.Client{Timeout: fetchTimeout, Transport: tr,
			// A redirect could take the request off the authenticated
			// server; bundle servers have no reason to send one.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
	}
}

// first fetches until a bundle is stored, retrying for firstFetchWait:
// the engine cannot start without one.
func (f *bundleFetcher) first(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, firstFetchWait)
	defer cancel()
	for {
		changed, err := f.fetch(ctx)
		if err == nil && changed {
			return nil
		}
		if err == nil {
			err = errors.New("no bundle in the answer")
		}
		f.log.Warn("first bundle fetch", "url", f.url, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("fetch bundle %s: %w", f.url, err)
		case <-f.clock.After(time.Second):
		}
	}
}

// run polls until ctx ends. Fetch and reload errors are logged (and
// counted by the engine's OnReload) and the running policy stays.
func (f *bundleFetcher) run(ctx context.Context, e *policy.Engine) error {
	t := f.clock.NewTicker(f.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
		}
		changed, err := f.fetch(ctx)
		if err != nil {
			f.log.Warn("bundle poll", "url", f.url, "err", err)
			continue
		}
		if changed {
			_ = e.Reload(ctx) // reported through the engine's log and OnReload
		}
	}
}

// fetch downloads the bundle unless the server says it is unchanged, and
// reports whether a new file was stored.
func (f *bundleFetcher) fetch(ctx context.Context) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.url, nil)
	if err != nil {
		return false, fmt.Errorf("bundle request: %w", err)
	}
	if f.etag != "" {
		req.Header.Set("If-None-Match", f.etag)
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return false, fmt.Errorf("get bundle: %w", err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusNotModified:
		return false, nil
	case http.StatusOK:
	default:
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
		return false, fmt.Errorf("get bundle: %s", resp.Status)
	}
	tmp, err := os.CreateTemp(filepath.Dir(f.file), ".bundle-*")
	if err != nil {
		return false, fmt.Errorf("store bundle: %w", err)
	}
	defer os.Remove(tmp.Name())
	n, err := io.Copy(tmp, io.LimitReader(resp.Body, maxBundleBytes+1))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return false, fmt.Errorf("read bundle: %w", err)
	}
	if n > maxBundleBytes {
		return false, fmt.Errorf("bundle larger than %d bytes", maxBundleBytes)
	}
	if err := os.Rename(tmp.Name(), f.file); err != nil {
		return false, fmt.Errorf("store bundle: %w", err)
	}
	f.etag = resp.Header.Get("ETag")
	f.log.Info("bundle fetched", "url", f.url, "etag", f.etag, "bytes", n)
	return true, nil
}
