package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/policy"
	"github.com/writmesh/writ/proxy"
)

// proxyOptions are the flags of the proxy role. The role runs when any
// listener is configured.
type proxyOptions struct {
	configFile   string
	inbound      string
	app          string
	appProtocol  string
	service      string
	upstreams    multiFlag
	httpProxy    string
	policyDir    string
	spiffeID     string
	accessLog    string
	drainTimeout time.Duration
	otlpEndpoint string
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func (o *proxyOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.configFile, "proxy-config", "", "static proxy configuration (YAML: inbound, outbound, routes, clusters); writd's xDS will replace it")
	fs.StringVar(&o.inbound, "inbound", "", "mesh port terminating mTLS for the local app, host:port")
	fs.StringVar(&o.app, "app", "", "the local application's host:port (with --inbound)")
	fs.StringVar(&o.appProtocol, "app-protocol", "http1", "how HTTP reaches the app: http1 or h2c (gRPC always uses h2c)")
	fs.StringVar(&o.service, "service", "", "the local service's name, given to policy (with --inbound)")
	fs.Var(&o.upstreams, "upstream", "NAME=HOST:PORT: a local plaintext port for cluster NAME (repeatable; clusters come from --proxy-config)")
	fs.StringVar(&o.httpProxy, "http-proxy", "", "HTTP proxy port, host:port: apps set HTTP_PROXY and call http://CLUSTER/...")
	fs.StringVar(&o.policyDir, "policy-dir", "", "Rego policy directory deciding inbound requests; without it every inbound request is denied")
	fs.StringVar(&o.spiffeID, "spiffe-id", "", "the SVID the proxy uses when the Workload API serves several (default: the first)")
	fs.StringVar(&o.accessLog, "access-log", "-", `access log file ("-": stdout, "": none)`)
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 10*time.Second, "how long in-flight requests may finish after SIGTERM")
	fs.StringVar(&o.otlpEndpoint, "otlp-endpoint", "", "OTLP/HTTP traces URL receiving a span per request, e.g. http://collector:4318/v1/traces (default: from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces; none: no export)")
}

// tracing resolves where spans go, as OpenTelemetry's SDKs read their
// environment, and the service.name they carry (OTEL_SERVICE_NAME, else
// --service, else writ-proxy).
func (o *proxyOptions) tracing() (url, service string, err error) {
	if o.otlpEndpoint != "" {
		url, err = proxy.OTLPTracesURL("", o.otlpEndpoint)
	} else {
		url, err = proxy.OTLPTracesURL(os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT"), os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
	}
	if err != nil {
		return "", "", err
	}
	service = os.Getenv("OTEL_SERVICE_NAME")
	if service == "" {
		service = o.service
	}
	return url, service, nil
}

func (o *proxyOptions) enabled() bool {
	return o.configFile != "" || o.inbound != "" || len(o.upstreams) > 0 || o.httpProxy != ""
}

// config assembles the static configuration from the file and the flags.
func (o *proxyOptions) config() (*proxy.Config, error) {
	cfg := &proxy.Config{}
	if o.configFile != "" {
		c, err := proxy.LoadConfig(o.configFile)
		if err != nil {
			return nil, err
		}
		cfg = c
	}
	if o.inbound != "" {
		if o.app == "" || o.service == "" {
			return nil, errors.New("--inbound needs --app and --service")
		}
		cfg.Inbound = append(cfg.Inbound, proxy.Inbound{Name: "inbound", Address: o.inbound, Service: o.service, App: o.app, AppProtocol: o.appProtocol})
	}
	for _, u := range o.upstreams {
		name, addr, ok := strings.Cut(u, "=")
		if !ok || name == "" || addr == "" {
			return nil, fmt.Errorf("--upstream %q: want NAME=HOST:PORT", u)
		}
		cfg.AddUpstream(name, addr)
	}
	if o.httpProxy != "" {
		cfg.AddHTTPProxy(o.httpProxy)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// proxyRole is the data plane inside writ-proxy. It waits for the node
// agent to serve the workload's SVID over the Workload API, then serves
// until ctx ends and drains.
type proxyRole struct {
	o        *proxyOptions
	cfg      *proxy.Config
	sock     string
	reg      *prometheus.Registry
	log      *slog.Logger
	stdout   io.Writer
	running  atomic.Pointer[proxy.Proxy]
	admin    atomic.Pointer[http.Handler]
	enforcer *enforcer.Enforcer
	engine   *policy.Engine
}

// ServeHTTP serves the proxy's admin paths (/metrics, /config_dump,
// /debug/pprof/) once it runs; before that, only its metrics.
func (r *proxyRole) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if h := r.admin.Load(); h != nil {
		(*h).ServeHTTP(w, req)
		return
	}
	if req.URL.Path == "/metrics" {
		promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{}).ServeHTTP(w, req)
		return
	}
	http.Error(w, "proxy not started: waiting for an SVID from the agent", http.StatusServiceUnavailable)
}

func newProxyRole(ctx context.Context, o *proxyOptions, sock string, stdout io.Writer, log *slog.Logger) (*proxyRole, error) {
	cfg, err := o.config()
	if err != nil {
		return nil, err
	}
	if _, _, err := o.tracing(); err != nil {
		return nil, err
	}
	r := &proxyRole{o: o, cfg: cfg, sock: sock, reg: prometheus.NewRegistry(), log: log, stdout: stdout}
	r.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if o.policyDir != "" {
		eng, err := policy.NewEngine(ctx, policy.Options{Dir: o.policyDir, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("load policy: %w", err)
		}
		m, err := enforcer.NewMetrics(r.reg)
		if err != nil {
			return nil, err
		}
		// Until the audit spool lands, decisions go to the log: not
		// durable, but never unrecorded.
		sink := enforcer.SinkFunc(func(_ context.Context, d enforcer.Decision) error {
			log.Info("decision", "decision_id", d.ID, "source", d.Source, "method", d.Method, "path", d.Path,
				"result", d.Result, "status", d.HTTPStatus, "cause", d.Cause, "policy_revision", d.PolicyRevision, "trace_id", d.TraceID)
			return nil
		})
		if r.enforcer, err = enforcer.New(enforcer.Options{Engine: eng, Sink: sink, Metrics: m, Logger: log}); err != nil {
			return nil, err
		}
		r.engine = eng
	} else {
		log.Warn("no --policy-dir: every inbound request will be denied")
	}
	return r, nil
}

// RunPolicy reloads --policy-dir when it changes (a bad policy never
// replaces the running one) until ctx ends.
func (r *proxyRole) RunPolicy(ctx context.Context) error {
	if r.engine == nil {
		<-ctx.Done()
		return nil
	}
	return r.engine.Run(ctx)
}

// Ready is nil once the proxy serves with a valid SVID.
func (r *proxyRole) Ready() error {
	p := r.running.Load()
	if p == nil {
		return errors.New("proxy not started: waiting for an SVID from the agent")
	}
	return p.Ready()
}

func (r *proxyRole) Run(ctx context.Context) error {
	opts := []workloadapi.X509SourceOption{workloadapi.WithClientOptions(workloadapi.WithAddr(r.sock))}
	if r.o.spiffeID != "" {
		want, err := spiffeid.FromString(r.o.spiffeID)
		if err != nil {
			return fmt.Errorf("--spiffe-id: %w", err)
		}
		opts = append(opts, workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
			for _, s := range svids {
				if s.ID == want {
					return s
				}
			}
			return svids[0]
		}))
	}
	// NewX509Source blocks until the agent serves an SVID for us.
	src, err := workloadapi.NewX509Source(ctx, opts...)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("svid source: %w", err)
	}
	defer src.Close()
	var alog io.Writer
	switch r.o.accessLog {
	case "-":
		alog = r.stdout
	case "":
	default:
		f, err := os.OpenFile(r.o.accessLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			return fmt.Errorf("access log: %w", err)
		}
		defer f.Close()
		alog = f
	}
	traces, service, err := r.o.tracing()
	if err != nil {
		return err
	}
	p, err := proxy.New(r.cfg, proxy.Options{Source: src, Enforcer: r.enforcer, Registry: r.reg, AccessLog: alog, DrainTimeout: r.o.drainTimeout, Log: r.log,
		OTLPTracesURL: traces, ServiceName: service})
	if err != nil {
		return err
	}
	h := p.AdminHandler(nil)
	r.admin.Store(&h)
	r.running.Store(p)
	svid, _ := src.GetX509SVID()
	r.log.Info("proxy serving", "spiffe_id", svid.ID.String())
	return p.Run(ctx)
}
