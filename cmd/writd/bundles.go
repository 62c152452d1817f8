package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/internal/run"
	"github.com/writmesh/writ/policy"
)

// The bundle service serves config.Policy.Dir as an OPA bundle at
// GET /bundles/{name}, with an ETag so that pollers (writ-enforcer,
// writ-proxy, a stock OPA's bundle plugin) get 304 while nothing changed:
// over mTLS on the decision API's listener, where the admin policy decides
// who may read it (setupDecision mounts it), and on the plain HTTP
// listener only when policy.plain_http says so.
func init() { components = append(components, setupBundles) }

func setupBundles(ctx context.Context, d *deps) error {
	if d.cfg.Policy == nil {
		return nil
	}
	s, err := newBundleService(ctx, *d.cfg.Policy, clockwork.NewRealClock(), d.metrics, d.log.With("component", "bundles"))
	if err != nil {
		return err
	}
	if d.cfg.Policy.PlainHTTP {
		d.mux.Handle("GET /bundles/{name}", s)
	}
	d.bundles = s
	d.tasks = append(d.tasks, run.Task{Name: "policy bundles", Run: s.Run})
	return nil
}

// servedBundle is one immutable built bundle.
type servedBundle struct {
	data     []byte
	etag     string
	revision string
	hash     string
}

// bundleService builds and serves the bundle. Only policy that compiles
// and passes the smoke test is ever served: a broken edit to the directory
// leaves the last good bundle in place. Safe for concurrent use.
type bundleService struct {
	cfg    config.Policy
	clock  clockwork.Clock
	log    *slog.Logger
	cur    atomic.Pointer[servedBundle]
	builds *prometheus.CounterVec
	// fp is the directory's fingerprint taken before the first build, so
	// that an edit made between it and Run is not missed.
	fp string
	// polled, if set, is called after every poll Run handles (tests).
	polled func()
}

func newBundleService(ctx context.Context, cfg config.Policy, clock clockwork.Clock, reg prometheus.Registerer, log *slog.Logger) (*bundleService, error) {
	s := &bundleService{cfg: cfg, clock: clock, log: log,
		builds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_policy_bundle_builds_total",
			Help: "Builds of the served policy bundle after the directory changed, by outcome.",
		}, []string{"outcome"}),
	}
	if err := reg.Register(s.builds); err != nil {
		return nil, fmt.Errorf("register bundle metrics: %w", err)
	}
	fp, err := policy.DirFingerprint(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("policy bundle from %s: %w", cfg.Dir, err)
	}
	s.fp = fp
	// writd does not start serving a policy it cannot build: there is no
	// previous good bundle to fall back on.
	if err := s.build(ctx); err != nil {
		return nil, fmt.Errorf("policy bundle from %s: %w", cfg.Dir, err)
	}
	return s, nil
}

// build packs the directory if its content changed and swaps it in.
func (s *bundleService) build(ctx context.Context) error {
	b, err := policy.BuildBundle(ctx, s.cfg.Dir, policy.Options{})
	if err != nil {
		s.builds.WithLabelValues("rejected").Inc()
		return err
	}
	if cur := s.cur.Load(); cur != nil && cur.hash == b.Hash {
		return nil
	}
	// The ETag names the content, so replicas serving the same directory
	// agree and a client's If-None-Match survives a writd restart.
	s.cur.Store(&servedBundle{data: b.Data, etag: strconv.Quote(b.Hash[:32]), revision: b.Revision, hash: b.Hash})
	s.builds.WithLabelValues("built").Inc()
	s.log.Info("policy bundle built", "bundle", s.cfg.BundleName, "revision", b.Revision, "bytes", len(b.Data))
	return nil
}

// Run rebuilds the bundle when the directory's files change, until ctx
// ends. A build that fails is logged and counted; the last good bundle
// stays.
func (s *bundleService) Run(ctx context.Context) error {
	t := s.clock.NewTicker(s.cfg.PollInterval.D())
	defer t.Stop()
	last, failed := s.fp, ""
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
		}
		s.poll(ctx, &last, &failed)
		if s.polled != nil {
			s.polled()
		}
	}
}

// poll rebuilds when the fingerprint moved from last and is not the one
// that failed last time.
func (s *bundleService) poll(ctx context.Context, last, failed *string) {
	fp, err := policy.DirFingerprint(s.cfg.Dir)
	if err != nil {
		s.log.Warn("policy dir poll", "dir", s.cfg.Dir, "err", err)
		return
	}
	if fp == *last || fp == *failed {
		return
	}
	bctx, cancel := context.WithTimeout(ctx, time.Minute)
	err = s.build(bctx)
	cancel()
	if err != nil {
		*failed = fp
		s.log.Error("policy bundle rejected; serving the previous one", "bundle", s.cfg.BundleName,
			"revision", s.cur.Load().revision, "err", err)
		return
	}
	*last, *failed = fp, ""
}

// ServeHTTP answers GET /bundles/{name}: the bundle, or 304 when the
// client's If-None-Match names the current one.
func (s *bundleService) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.PathValue("name") != s.cfg.BundleName {
		http.NotFound(w, r)
		return
	}
	b := s.cur.Load()
	w.Header().Set("ETag", b.etag)
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Writ-Policy-Revision", b.revision)
	if etagMatches(r.Header.Get("If-None-Match"), b.etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/gzip")
	w.Header().Set("Content-Length", strconv.Itoa(len(b.data)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(b.data)
	}
}

// etagMatches implements If-None-Match's weak comparison over a list.
func etagMatches(header, etag string) bool {
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimPrefix(strings.TrimSpace(t), "W/")
		if t == etag || t == "*" {
			return true
		}
	}
	return false
}
