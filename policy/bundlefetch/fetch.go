// Package bundlefetch pulls an OPA bundle from a bundle service — writd's
// GET /bundles/NAME, or any server speaking OPA's bundle protocol — into a
// local file that a policy.Engine loads, polling with If-None-Match. It is
// shared by writ-enforcer and writ-proxy; the caller supplies the mTLS
// client configuration (its SVID, the server's expected SPIFFE ID), so the
// package needs nothing of the identity packages.
package bundlefetch

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/jonboulle/clockwork"
)

// Bounds of a bundle download: the engine refuses larger policy sets
// anyway, and a poll must not hang.
const (
	MaxBundleBytes = 64 << 20
	fetchTimeout   = 30 * time.Second
	maxRetryPause  = 30 * time.Second
)

// Options configure a Fetcher.
type Options struct {
	// URL is the bundle's http or https URL.
	URL string
	// Dir holds the stored bundle (bundle.tar.gz); it must exist.
	Dir string
	// Interval is how often Run polls.
	Interval time.Duration
	// TLS is the mTLS client configuration of an https URL; plain http
	// URLs need none.
	TLS   *tls.Config
	Clock clockwork.Clock
	Log   *slog.Logger
}

// Fetcher polls a bundle service and stores a changed bundle in File. The
// engine that loads File compiles and smoke-tests it before any swap, so
// a bad bundle changes nothing, and a failed fetch leaves File as it was:
// the last good bundle stays. Not safe for concurrent use: one goroutine
// runs it.
type Fetcher struct {
	url      string
	file     string
	interval time.Duration
	clock    clockwork.Clock
	client   *http.Client
	log      *slog.Logger
	etag     string
}

// CheckURL accepts http and https URLs with a host.
func CheckURL(raw string) (https bool, err error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return false, fmt.Errorf("bundle url %q: want an http or https URL", raw)
	}
	return u.Scheme == "https", nil
}

// New returns a Fetcher for o.
func New(o Options) *Fetcher {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil // a bundle server inside the mesh is reached directly
	tr.TLSClientConfig = o.TLS
	tr.MaxResponseHeaderBytes = 64 << 10
	if o.Clock == nil {
		o.Clock = clockwork.NewRealClock()
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return &Fetcher{
		url: o.URL, file: filepath.Join(o.Dir, "bundle.tar.gz"), interval: o.Interval, clock: o.Clock, log: o.Log,
		client: &http.Client{Timeout: fetchTimeout, Transport: tr,
			// A redirect could take the request off the authenticated
			// server; bundle servers have no reason to send one.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
	}
}

// File is where the bundle is stored, for policy.Options.Bundle.
func (f *Fetcher) File() string { return f.file }

// First fetches until a bundle is stored: an engine cannot start without
// one. It retries after 1 s, doubling up to 30 s, for at most wait (zero:
// until ctx ends).
func (f *Fetcher) First(ctx context.Context, wait time.Duration) error {
	if wait > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, wait)
		defer cancel()
	}
	pause := time.Second
	for {
		changed, err := f.Fetch(ctx)
		if err == nil && changed {
			return nil
		}
		if err == nil {
			err = errors.New("no bundle in the answer")
		}
		f.log.Warn("first bundle fetch", "url", f.url, "err", err, "retry_in", pause)
		select {
		case <-ctx.Done():
			return fmt.Errorf("fetch bundle %s: %w", f.url, err)
		case <-f.clock.After(pause):
		}
		pause = min(2*pause, maxRetryPause)
	}
}

// Run polls every Interval until ctx ends and calls reload after storing a
// changed bundle. Fetch and reload errors are logged (reload errors are
// the engine's to count) and the running policy stays.
func (f *Fetcher) Run(ctx context.Context, reload func(context.Context) error) error {
	t := f.clock.NewTicker(f.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
		}
		changed, err := f.Fetch(ctx)
		if err != nil {
			f.log.Warn("bundle poll", "url", f.url, "err", err)
			continue
		}
		if changed {
			if err := reload(ctx); err != nil {
				f.log.Warn("bundle reload", "url", f.url, "err", err)
			}
		}
	}
}

// Fetch downloads the bundle unless the server says it is unchanged, and
// reports whether a new file was stored.
func (f *Fetcher) Fetch(ctx context.Context) (bool, error) {
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
	n, err := io.Copy(tmp, io.LimitReader(resp.Body, MaxBundleBytes+1))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return false, fmt.Errorf("read bundle: %w", err)
	}
	if n > MaxBundleBytes {
		return false, fmt.Errorf("bundle larger than %d bytes", MaxBundleBytes)
	}
	if err := os.Rename(tmp.Name(), f.file); err != nil {
		return false, fmt.Errorf("store bundle: %w", err)
	}
	f.etag = resp.Header.Get("ETag")
	f.log.Info("bundle fetched", "url", f.url, "etag", f.etag, "bytes", n)
	return true, nil
}
