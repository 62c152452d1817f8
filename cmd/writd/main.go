// Command writd is Writ's control plane: certificate authority, node API,
// trust bundle, admin API, health and metrics.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/writmesh/writ/api/admin"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/internal/run"
	"github.com/writmesh/writ/store"
)

const usage = `writd is Writ's control plane.

Usage:
  writd serve --config writ.yaml   run the control plane
  writd gen-kek                    print a new key-encryption key (base64) for ca.kek_file / WRIT_CA_KEK
  writd check-config --config F    validate a config file and exit

Environment:
  WRIT_DATABASE_URL   overrides database_url
  WRIT_CA_KEK         the key-encryption key, instead of ca.kek_file

writd serve applies database migrations at start, listens on listen.http
(/healthz, /readyz, /metrics, /bundle), listen.grpc (node API, TLS), the
admin unix socket and, when set, listen.decision (the AuthZEN and OPA data
decision API, TLS), and stops gracefully on SIGTERM or SIGINT.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := runMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func runMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	case "gen-kek":
		k, err := authority.GenerateKEK()
		if err != nil {
			fmt.Fprintln(stderr, "writd:", err)
			return 1
		}
		fmt.Fprintln(stdout, k)
		return 0
	case "serve", "check-config":
	default:
		fmt.Fprintf(stderr, "writd: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	fs := flag.NewFlagSet("writd "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "writ.yaml", "path of the config file")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	cfg, err := config.LoadServer(*cfgPath)
	if err != nil {
		fmt.Fprintf(stderr, "writd: invalid configuration:\n%v\n", err)
		return 2
	}
	if args[0] == "check-config" {
		fmt.Fprintf(stdout, "%s: ok\n", *cfgPath)
		return 0
	}
	log := newLogger(cfg.Log, stderr)
	if err := serve(ctx, cfg, log); err != nil {
		log.Error("writd stopped", "error", err)
		return 1
	}
	log.Info("writd stopped")
	return 0
}

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// deps is what writd's parts are built from. Components (see components)
// add their HTTP routes to mux, their gRPC services to grpc (served with the
// control-plane SVID over TLS on listen.grpc), their admin routes to
// adminMux, and their long-running parts to tasks.
type deps struct {
	cfg      *config.Server
	log      *slog.Logger
	td       spiffeid.TrustDomain
	pool     *pgxpool.Pool
	ca       *authority.CA
	reg      *authority.Registry
	ident    *authority.ServerIdentity
	metrics  *prometheus.Registry
	mux      *http.ServeMux
	grpc     *grpc.Server
	adminMux *http.ServeMux
	tasks    []run.Task
	// audit records writd's own events (changes, issuance, logins,
	// decision-API answers) under auditSource, and collects the shippers'.
	audit       *collector.Collector
	auditSource string
	// bundles is the policy bundle service, served over mTLS by the
	// decision API when both are configured.
	bundles http.Handler
}

// components are optional parts of writd, each in its own file, which
// registers its setup function here from an init function. A setup error
// stops writd from starting.
var components []func(ctx context.Context, d *deps) error

// serve wires writd together and runs it until ctx is cancelled.
func serve(ctx context.Context, cfg *config.Server, log *slog.Logger) error {
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return fmt.Errorf("trust domain: %w", err)
	}
	log.Info("writd starting", "trust_domain", td.Name(), "replica", cfg.ReplicaID)

	pool, err := store.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := store.Migrate(ctx, pool, log); err != nil {
		return err
	}

	metrics := prometheus.NewRegistry()
	metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// The collector first: the CA's first intermediate is an audit event.
	col, err := collector.New(collector.Options{Pool: pool, Logger: log.With("component", "audit"), Registerer: metrics,
		AsyncCommit: cfg.Audit.Durability == config.AuditFsyncGrouped})
	if err != nil {
		return err
	}
	// Replicas share the control-plane SPIFFE ID; each has its own chain.
	auditSource := authority.ControlPlaneID(td).String() + "#" + cfg.ReplicaID
	opts := authority.Options{
		TrustDomain: td,
		Pool:        pool,
		Config:      cfg.CA,
		ReplicaID:   cfg.ReplicaID,
		OnIssuance:  issuanceEvents(col, auditSource),
		Log:         log.With("component", "ca"),
	}
	if cfg.CA.Upstream != nil {
		up, err := newUpstream(cfg.CA.Upstream, log.With("component", "upstream"))
		if err != nil {
			return err
		}
		opts.Upstream = up
	} else {
		if opts.KEK, err = authority.LoadKEK(cfg.CA.KEKFile, os.Getenv); err != nil {
			return err
		}
		if cfg.CA.RootCertFile != "" {
			if opts.RootCertPEM, err = os.ReadFile(cfg.CA.RootCertFile); err != nil {
				return fmt.Errorf("root cert: %w", err)
			}
			if opts.RootKeyPEM, err = os.ReadFile(cfg.CA.RootKeyFile); err != nil {
				return fmt.Errorf("root key: %w", err)
			}
		}
	}
	ca, err := authority.NewCA(ctx, opts)
	if err != nil {
		return fmt.Errorf("certificate authority: %w", err)
	}
	reg := authority.NewRegistry(pool, td, nil)
	reg.OnIssuance(issuanceEvents(col, auditSource))
	ident, err := authority.NewServerIdentity(ctx, ca, reg, td, nil, log.With("component", "identity"))
	if err != nil {
		return err
	}
	d := &deps{cfg: cfg, log: log, td: td, pool: pool, ca: ca, reg: reg, ident: ident, metrics: metrics,
		audit: col, auditSource: auditSource,
		mux: http.NewServeMux(), adminMux: http.NewServeMux(),
		grpc: grpc.NewServer(authority.GRPCServerOptions(ident.TLSConfig())...)}

	nodeapi.RegisterNodeServer(d.grpc, authority.NewNodeServer(ca, reg, authority.NodeServerOptions{TrustDomain: td, Log: log.With("component", "node-api"), Metrics: metrics}))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(d.grpc, hs)

	d.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	d.mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		pctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := pool.Ping(pctx); err != nil {
			http.Error(w, "database unreachable", http.StatusServiceUnavailable)
			return
		}
		if _, err := ca.Bundle(pctx); err != nil {
			http.Error(w, "bundle unavailable", http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	d.mux.Handle("GET /metrics", promhttp.HandlerFor(metrics, promhttp.HandlerOpts{}))
	d.mux.Handle("GET /bundle", authority.BundleHandler(ca, log))

	for _, setup := range components {
		if err := setup(ctx, d); err != nil {
			return err
		}
	}

	var rotator admin.RootRotator
	if cfg.CA.Upstream == nil {
		rotator = ca
	}
	uids := make([]uint32, len(cfg.Admin.AllowedUIDs))
	for i, u := range cfg.Admin.AllowedUIDs {
		uids[i] = uint32(u)
	}
	adm := admin.New(admin.Options{Registry: reg, Bundle: ca.Bundle, CA: rotator, Pool: pool, AllowedUIDs: uids, Log: log.With("component", "admin"),
		Audit: adminCallEvents(col, auditSource)})
	adm.Handle("/", d.adminMux)

	grpcL, err := net.Listen("tcp", cfg.Listen.GRPC)
	if err != nil {
		return fmt.Errorf("listen grpc: %w", err)
	}
	httpL, err := net.Listen("tcp", cfg.Listen.HTTP)
	if err != nil {
		return fmt.Errorf("listen http: %w", err)
	}
	adminL, err := admin.Listen(cfg.Admin.Socket)
	if err != nil {
		return err
	}
	hsrv := &http.Server{Handler: d.mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 32 << 10}

	log.Info("writd serving", "http", httpL.Addr().String(), "grpc", grpcL.Addr().String(), "admin_socket", cfg.Admin.Socket)
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	tasks := append([]run.Task{
		{Name: "ca", Run: ca.Run},
		{Name: "identity", Run: ident.Run},
		{Name: "admin", Run: func(ctx context.Context) error { return adm.Serve(ctx, adminL) }},
		{Name: "grpc", Run: func(ctx context.Context) error {
			errc := make(chan error, 1)
			go func() { errc <- d.grpc.Serve(grpcL) }()
			select {
			case err := <-errc:
				return err
			case <-ctx.Done():
			}
			hs.Shutdown()
			stopped := make(chan struct{})
			go func() { d.grpc.GracefulStop(); close(stopped) }()
			select {
			case <-stopped:
			case <-time.After(10 * time.Second):
				d.grpc.Stop()
			}
			return nil
		}},
		{Name: "http", Run: func(ctx context.Context) error {
			errc := make(chan error, 1)
			go func() { errc <- hsrv.Serve(httpL) }()
			select {
			case err := <-errc:
				if errors.Is(err, http.ErrServerClosed) {
					return nil
				}
				return err
			case <-ctx.Done():
			}
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			return hsrv.Shutdown(sctx)
		}},
	}, d.tasks...)
	return run.Group(ctx, 20*time.Second, tasks...)
}
