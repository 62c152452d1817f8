// Command writ-enforcer is Writ's standalone Envoy ext_authz v3 server: it
// answers Envoy's Check calls over gRPC with mTLS (its X.509 SVID comes from
// the SPIFFE Workload API), deciding every request with the same Rego
// policies and the same enforcer as writ-proxy's in-process check.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/internal/cliflags"
	taskrun "github.com/writmesh/writ/internal/run"
	"github.com/writmesh/writ/policy"
	"github.com/writmesh/writ/policy/bundlefetch"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `writ-enforcer: Writ's Envoy ext_authz v3 gRPC server.

It decides every request Envoy sends it (envoy.service.auth.v3.Authorization
Check) with Rego policy, using the input document opa-envoy-plugin builds,
so policies written for it run unchanged. It serves grpc.health.v1 on the
same port. Clients must present an X.509 SVID: by default any workload of
this enforcer's trust domain may ask, or only the IDs given with
--allow-spiffe-id. The enforcer's own SVID comes from the SPIFFE Workload
API (writ-proxy's agent, or SPIRE's).

Policy comes from exactly one of:
  --policy-dir DIR     Rego modules and JSON/YAML data, reloaded on change
  --bundle-url URL     an OPA bundle polled from writd's bundle service
                       (GET /bundles/NAME, with ETag)
  --bundle-file FILE   an OPA bundle file (.tar.gz), reloaded on change
A policy that fails to parse, compile or smoke-test never replaces the
running one: the error is logged and counted in writ_policy_reloads_total.

Every decision is written as one JSON line to --decision-log before Envoy
gets its answer; a decision that cannot be written is a deny.

The admin address serves /metrics (Prometheus), /healthz and /readyz.

Usage:
  writ-enforcer --workload-api unix:///run/writ/agent.sock \
    --policy-dir /etc/writ/policies [--listen 0.0.0.0:9191]

Flags:
`

// Shutdown bounds: in-flight checks get shutdownTimeout to finish, the
// whole process shutdownGrace.
const (
	defaultGCPercent   = 400
	defaultMemLimitMiB = 1024
	shutdownTimeout    = 5 * time.Second
	shutdownGrace      = 10 * time.Second
	svidWait           = 30 * time.Second
	// firstFetchWait bounds the wait for the first bundle: the enforcer
	// cannot serve without one, and a supervisor restart says so louder.
	firstFetchWait = 30 * time.Second
)

// listFlag collects a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

type options struct {
	listen        string
	adminAddr     string
	workloadAPI   string
	spiffeID      string
	trustDomain   string
	allowIDs      listFlag
	policyDir     string
	bundleURL     string
	bundleServer  string
	bundleFile    string
	bundlePoll    time.Duration
	pollInterval  time.Duration
	decisionPath  string
	decisionLog   string
	checkTimeout  time.Duration
	maxBodyBytes  int
	protoDescs    string
	cacheSize     int
	logLevel      string
	allowNetwork  bool
	maxConcurrent uint
	pprof         bool
	gcPercent     int
	memLimitMiB   int64
	audit         audit.RecorderOptions
}

func parseFlags(args []string, stdout, stderr io.Writer) (*options, int) {
	o := options{}
	fs := flag.NewFlagSet("writ-enforcer", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", "127.0.0.1:9191", "ext_authz gRPC address (mTLS); use 0.0.0.0:9191 for Envoy on other hosts")
	fs.StringVar(&o.adminAddr, "admin-addr", "127.0.0.1:9192", "admin HTTP address serving /metrics, /healthz and /readyz")
	fs.StringVar(&o.workloadAPI, "workload-api", os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "SPIFFE Workload API address, unix:///path (default $SPIFFE_ENDPOINT_SOCKET)")
	fs.StringVar(&o.spiffeID, "spiffe-id", "", "which of the SVIDs the Workload API offers to serve with (default: the first)")
	fs.StringVar(&o.trustDomain, "trust-domain", "", "trust domain whose workloads may call (default: the enforcer's own)")
	fs.Var(&o.allowIDs, "allow-spiffe-id", "a SPIFFE ID allowed to call; repeat for more; replaces the trust-domain rule")
	fs.StringVar(&o.policyDir, "policy-dir", "", "policy directory, hot-reloaded")
	fs.StringVar(&o.bundleURL, "bundle-url", "", "OPA bundle URL to poll, e.g. https://writd:8443/bundles/mesh (mTLS with the enforcer's SVID) or http://writd:8080/bundles/mesh")
	fs.StringVar(&o.bundleServer, "bundle-server-id", "", "SPIFFE ID the https bundle server must present (default: spiffe://TRUST-DOMAIN/writ/control-plane, writd's)")
	fs.StringVar(&o.bundleFile, "bundle-file", "", "OPA bundle file (.tar.gz), hot-reloaded")
	fs.DurationVar(&o.bundlePoll, "bundle-poll", 10*time.Second, "how often --bundle-url is polled")
	fs.DurationVar(&o.pollInterval, "poll-interval", policy.DefaultPollInterval, "how often --policy-dir or --bundle-file is checked for changes")
	fs.StringVar(&o.decisionPath, "decision", policy.DefaultDecisionPath, "the policy rule that decides")
	fs.StringVar(&o.decisionLog, "decision-log", "-", "without --audit-spool-dir: file to append decisions to as JSON lines (not durable audit); - for stderr")
	o.audit.RegisterFlags(fs)
	fs.DurationVar(&o.checkTimeout, "check-timeout", enforcer.DefaultCheckTimeout, "deadline of one check, whatever the client asks")
	fs.IntVar(&o.maxBodyBytes, "max-body-bytes", enforcer.DefaultMaxBodyBytes, "largest request body parsed into input.parsed_body")
	fs.StringVar(&o.protoDescs, "proto-descriptors", "", "FileDescriptorSet (protoc --descriptor_set_out --include_imports) to decode gRPC request messages into input.parsed_body; Envoy must send bodies with pack_as_bytes")
	fs.IntVar(&o.cacheSize, "cache-size", 0, "decision cache entries (0: default, negative: off)")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&o.allowNetwork, "allow-network-builtins", false, "let policies call http.send and net.lookup_ip_addr (turns the cache off)")
	fs.UintVar(&o.maxConcurrent, "max-concurrent-streams", 1024, "concurrent gRPC streams per client connection")
	fs.BoolVar(&o.pprof, "pprof", false, "serve Go's /debug/pprof on the admin address (keep it on loopback)")
	fs.IntVar(&o.gcPercent, "gc-percent", defaultGCPercent, "garbage collector target, as GOGC (which wins when set); checks allocate, and collecting less often is most of the throughput")
	fs.Int64Var(&o.memLimitMiB, "memory-limit-mib", defaultMemLimitMiB, "soft memory limit in MiB, as GOMEMLIMIT (which wins when set), so a relaxed collector still bounds the heap; 0 for none")
	if done, code := cliflags.Parse(fs, "writ-enforcer", usage, args, stdout, stderr); done {
		return nil, code
	}
	n := 0
	for _, s := range []string{o.policyDir, o.bundleURL, o.bundleFile} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		fmt.Fprintln(stderr, "writ-enforcer: want exactly one of --policy-dir, --bundle-url and --bundle-file (see --help)")
		return nil, 2
	}
	if o.workloadAPI == "" {
		fmt.Fprintln(stderr, "writ-enforcer: missing --workload-api (or SPIFFE_ENDPOINT_SOCKET) (see --help)")
		return nil, 2
	}
	if o.gcPercent < 10 || o.memLimitMiB < 0 {
		fmt.Fprintln(stderr, "writ-enforcer: --gc-percent must be at least 10 and --memory-limit-mib not negative")
		return nil, 2
	}
	if o.audit.Enabled() && o.audit.Collector == "" {
		fmt.Fprintln(stderr, "writ-enforcer: --audit-spool-dir needs --audit-collector (writd's gRPC address)")
		return nil, 2
	}
	if o.bundlePoll <= 0 || o.pollInterval <= 0 || o.checkTimeout <= 0 {
		fmt.Fprintln(stderr, "writ-enforcer: --bundle-poll, --poll-interval and --check-timeout must be positive")
		return nil, 2
	}
	return &o, -1
}

// bundleTLS is the mTLS client configuration for an https bundle URL: the
// enforcer's SVID, and the server must present the bundle server's SPIFFE
// ID. Plain http URLs get none.
func (o *options) bundleTLS(src *workloadapi.X509Source, td spiffeid.TrustDomain, clock clockwork.Clock) (*tls.Config, error) {
	https, err := bundlefetch.CheckURL(o.bundleURL)
	if err != nil {
		return nil, fmt.Errorf("--bundle-url: %w", err)
	}
	if !https {
		return nil, nil
	}
	want, err := spiffeid.FromSegments(td, "writ", "control-plane")
	if o.bundleServer != "" {
		want, err = spiffeid.FromString(o.bundleServer)
	}
	if err != nil {
		return nil, fmt.Errorf("--bundle-server-id: %w", err)
	}
	return svidtls.ClientConfig(src, src, svidtls.AuthorizeID(want), clock), nil
}

// tuneGC relaxes the garbage collector: a check allocates its input and
// response, and with Go's default target the collector takes a large share
// of the CPU. The soft memory limit keeps the heap bounded all the same.
// GOGC and GOMEMLIMIT, when set, are the operator's choice and stay.
func tuneGC(o *options, getenv func(string) string, log *slog.Logger) {
	if getenv("GOGC") == "" {
		debug.SetGCPercent(o.gcPercent)
	}
	if getenv("GOMEMLIMIT") == "" && o.memLimitMiB > 0 {
		debug.SetMemoryLimit(o.memLimitMiB << 20)
	}
	log.Debug("garbage collector", "gc_percent", o.gcPercent, "memory_limit_mib", o.memLimitMiB)
}

// authorizer decides which clients may call: the listed IDs, else members
// of the trust domain.
func (o *options) authorizer(own spiffeid.ID) (svidtls.Authorizer, error) {
	if len(o.allowIDs) > 0 {
		allowed := map[spiffeid.ID]bool{}
		for _, s := range o.allowIDs {
			id, err := spiffeid.FromString(s)
			if err != nil {
				return nil, fmt.Errorf("--allow-spiffe-id %q: %w", s, err)
			}
			allowed[id] = true
		}
		return func(id spiffeid.ID) error {
			if !allowed[id] {
				return fmt.Errorf("peer %s is not an allowed client", id)
			}
			return nil
		}, nil
	}
	td := own.TrustDomain()
	if o.trustDomain != "" {
		var err error
		if td, err = spiffeid.TrustDomainFromString(o.trustDomain); err != nil {
			return nil, fmt.Errorf("--trust-domain: %w", err)
		}
	}
	return svidtls.AuthorizeMemberOf(td), nil
}

// run is writ-enforcer's whole life: parse, wire, serve until ctx ends.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, code := parseFlags(args, stdout, stderr)
	if o == nil {
		return code
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		fmt.Fprintf(stderr, "writ-enforcer: --log-level %q: want debug, info, warn or error\n", o.logLevel)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	tuneGC(o, os.Getenv, log)
	if err := serve(ctx, o, log, stderr); err != nil {
		log.Error("writ-enforcer stopped", "error", err)
		return 1
	}
	log.Info("writ-enforcer stopped")
	return 0
}

func serve(ctx context.Context, o *options, log *slog.Logger, stderr io.Writer) error {
	clock := clockwork.NewRealClock()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics, err := enforcer.NewMetrics(reg)
	if err != nil {
		return err
	}

	// The SVID first: without it nothing can be served.
	sctx, cancel := context.WithTimeout(ctx, svidWait)
	srcOpts := []workloadapi.X509SourceOption{workloadapi.WithClientOptions(workloadapi.WithAddr(o.workloadAPI))}
	if o.spiffeID != "" {
		want, err := spiffeid.FromString(o.spiffeID)
		if err != nil {
			cancel()
			return fmt.Errorf("--spiffe-id: %w", err)
		}
		srcOpts = append(srcOpts, workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
			for _, s := range svids {
				if s.ID == want {
					return s
				}
			}
			return svids[0]
		}))
	}
	src, err := workloadapi.NewX509Source(sctx, srcOpts...)
	cancel()
	if err != nil {
		return fmt.Errorf("x509 svid from workload api %s: %w", o.workloadAPI, err)
	}
	defer src.Close()
	svid, err := src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("x509 svid: %w", err)
	}
	if o.spiffeID != "" && svid.ID.String() != o.spiffeID {
		return fmt.Errorf("the workload api offers no svid for %s (first is %s)", o.spiffeID, svid.ID)
	}
	authz, err := o.authorizer(svid.ID)
	if err != nil {
		return err
	}

	var sink enforcer.Sink
	var rec *audit.Recorder
	if o.audit.Enabled() {
		// Decisions go to the durable spool, shipped to writd's
		// collector under this enforcer's SVID.
		rec, err = audit.OpenRecorder(o.audit, audit.RecorderEnv{
			ID: svid.ID.String(), TLS: collectorTLS(src, svid.ID.TrustDomain(), clock),
			Clock: clock, Logger: log.With("component", "audit"), Registerer: reg,
		})
		if err != nil {
			return err
		}
		defer rec.Close()
		sink = &enforcer.AuditSink{Spool: rec.Spool, Redaction: rec.Redaction}
	} else {
		log.Warn("no --audit-spool-dir: decisions go to the decision log only, which is not the durable audit trail")
		dl, closeSink, err := openDecisionLog(o.decisionLog, stderr)
		if err != nil {
			return err
		}
		defer closeSink()
		sink = dl
	}
	// Enforcers of the decisions AuthorizationPolicies bind (the
	// writ.authz_decision context extension writd sets for Envoy), made
	// on first use from the same policy source.
	var binder atomic.Pointer[enforcer.Binder]
	// Policy: a bundle URL is fetched once before the engine starts, then
	// polled.
	popts := policy.Options{
		Dir:          o.policyDir,
		Bundle:       o.bundleFile,
		DecisionPath: o.decisionPath,
		AllowNetwork: o.allowNetwork,
		CacheSize:    o.cacheSize,
		PollInterval: o.pollInterval,
		Clock:        clock,
		Logger:       log.With("component", "policy"),
		OnReload: func(r policy.ReloadEvent) {
			metrics.ObserveReload(r)
			if rec != nil {
				recordReload(rec.Spool, policyName(o), r, log)
			}
			// With --policy-dir the engine polls the directory itself;
			// the engines of bound decisions follow it. (With a bundle
			// URL the fetcher reloads them all.)
			if b := binder.Load(); r.Err == nil && o.bundleURL == "" && b != nil {
				if err := b.Reload(context.Background()); err != nil {
					log.Warn("policy reload for a bound decision", "err", err)
				}
			}
		},
	}
	var fetcher *bundlefetch.Fetcher
	if o.bundleURL != "" {
		dir, err := os.MkdirTemp("", "writ-enforcer-bundle-")
		if err != nil {
			return fmt.Errorf("bundle cache dir: %w", err)
		}
		defer os.RemoveAll(dir)
		tlsCfg, err := o.bundleTLS(src, svid.ID.TrustDomain(), clock)
		if err != nil {
			return err
		}
		fetcher = bundlefetch.New(bundlefetch.Options{URL: o.bundleURL, Dir: dir, Interval: o.bundlePoll, TLS: tlsCfg, Clock: clock, Log: log.With("component", "bundle")})
		if err := fetcher.First(ctx, firstFetchWait); err != nil {
			return err
		}
		popts.Bundle = fetcher.File()
	}
	engine, err := policy.NewEngine(ctx, popts)
	if err != nil {
		return fmt.Errorf("load policy: %w", err)
	}

	var protos *protoregistry.Files
	if o.protoDescs != "" {
		if protos, err = enforcer.LoadProtoDescriptors(o.protoDescs); err != nil {
			return err
		}
	}

	eopts := enforcer.Options{
		Engine: engine, Sink: sink, MaxBodyBytes: o.maxBodyBytes, ProtoDescriptors: protos,
		Metrics: metrics, Clock: clock, Logger: log.With("component", "enforcer"),
	}
	enf, err := enforcer.New(eopts)
	if err != nil {
		return err
	}
	b := enforcer.NewBinder(eopts, func(ctx context.Context, decision string) (*policy.Engine, error) {
		bopts := popts
		bopts.DecisionPath, bopts.OnReload = decision, nil // reloads are recorded once, by the policy's own engine
		return policy.NewEngine(ctx, bopts)
	})
	binder.Store(b)
	authzSrv := enforcer.NewServer(enf, o.checkTimeout).WithBinder(b)
	gopts := append(enforcer.ServerOptions(),
		grpc.Creds(credentials.NewTLS(svidtls.ServerConfig(src, src, authz, clock))),
		grpc.MaxConcurrentStreams(uint32(min(o.maxConcurrent, 1<<16))),
		grpc.ConnectionTimeout(10*time.Second),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 15 * time.Minute}),
	)
	g := grpc.NewServer(gopts...)
	authzSrv.Register(g)

	lis, err := net.Listen("tcp", o.listen)
	if err != nil {
		return fmt.Errorf("listen for ext_authz: %w", err)
	}
	adminL, err := net.Listen("tcp", o.adminAddr)
	if err != nil {
		lis.Close()
		return fmt.Errorf("listen for admin: %w", err)
	}
	var serving atomic.Bool
	mux := adminMux(reg, engine, src, &serving)
	if o.pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	admin := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 60 * time.Second}
	log.Info("writ-enforcer starting", "listen", lis.Addr().String(), "admin_addr", adminL.Addr().String(),
		"spiffe_id", svid.ID.String(), "policy_revision", engine.Revision(), "decision", o.decisionPath)

	tasks := []taskrun.Task{
		{Name: "ext_authz", Run: func(ctx context.Context) error {
			errc := make(chan error, 1)
			serving.Store(true)
			go func() { errc <- g.Serve(lis) }()
			select {
			case err := <-errc:
				serving.Store(false)
				return fmt.Errorf("grpc server: %w", err)
			case <-ctx.Done():
			}
			// Health checkers see NOT_SERVING first; in-flight checks
			// finish within shutdownTimeout, then connections are cut.
			serving.Store(false)
			authzSrv.Shutdown()
			stopped := make(chan struct{})
			go func() { g.GracefulStop(); close(stopped) }()
			select {
			case <-stopped:
			case <-time.After(shutdownTimeout):
				g.Stop()
			}
			return nil
		}},
		{Name: "admin", Run: func(ctx context.Context) error {
			errc := make(chan error, 1)
			go func() { errc <- admin.Serve(adminL) }()
			select {
			case err := <-errc:
				return fmt.Errorf("admin server: %w", err)
			case <-ctx.Done():
				sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
				defer cancel()
				return admin.Shutdown(sctx)
			}
		}},
	}
	if rec != nil {
		tasks = append(tasks, taskrun.Task{Name: "audit shipper", Run: rec.Run})
	}
	if fetcher != nil {
		tasks = append(tasks, taskrun.Task{Name: "bundle poll", Run: func(ctx context.Context) error {
			return fetcher.Run(ctx, func(ctx context.Context) error {
				err := engine.Reload(ctx) // reload errors are counted by OnReload
				if err := b.Reload(ctx); err != nil {
					log.Warn("policy reload for a bound decision", "err", err)
				}
				return err
			})
		}})
	} else {
		tasks = append(tasks, taskrun.Task{Name: "policy reload", Run: engine.Run})
	}
	return taskrun.Group(ctx, shutdownGrace, tasks...)
}

// adminMux serves metrics, liveness and readiness. Ready means serving
// ext_authz with an SVID in hand; a rejected policy reload does not make
// the enforcer unready, since the previous policy keeps answering.
func adminMux(reg *prometheus.Registry, engine *policy.Engine, src *workloadapi.X509Source, serving *atomic.Bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if _, err := src.GetX509SVID(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: no svid: %v\n", err)
			return
		}
		if !serving.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, "not ready: not serving ext_authz\n")
			return
		}
		fmt.Fprintf(w, "ready: policy %s\n", engine.Revision())
		if err := engine.LastError(); err != nil {
			// Still ready: the running policy answers. Say why the new
			// one was refused.
			fmt.Fprintf(w, "last policy reload rejected: %v\n", err)
		}
	})
	return mux
}

// collectorTLS presents the enforcer's SVID to writd's gRPC port and
// accepts only writd's control-plane identity (authority.ControlPlaneID,
// not imported here: it would pull the CA into the enforcer).
func collectorTLS(src *workloadapi.X509Source, td spiffeid.TrustDomain, clock clockwork.Clock) *tls.Config {
	return svidtls.ClientConfig(src, src, svidtls.AuthorizeID(spiffeid.RequireFromPath(td, "/writ/control-plane")), clock)
}

// policyName names the enforcer's policy source in its audit events.
func policyName(o *options) string {
	switch {
	case o.policyDir != "":
		return "dir:" + o.policyDir
	case o.bundleURL != "":
		return "bundle:" + o.bundleURL
	}
	return "bundle-file:" + o.bundleFile
}

// recordReload appends a policy reload to the audit spool. The reload has
// happened either way; a refused append is logged at error level.
func recordReload(sp *audit.Spool, name string, r policy.ReloadEvent, log *slog.Logger) {
	ev, err := enforcer.PolicyReloadEvent(name, r)
	if err == nil {
		err = sp.Append(context.Background(), &ev)
	}
	if err != nil {
		log.Error("audit: policy reload not recorded", "policy", name, "revision", r.Revision, "err", err)
	}
}
