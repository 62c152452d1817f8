package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/policy"
	"github.com/writmesh/writ/policy/bundlefetch"
	"github.com/writmesh/writ/proxy"
	"github.com/writmesh/writ/proxy/xdsclient"
)

// proxyOptions are the flags of the proxy role. The role runs when any
// listener is configured.
type proxyOptions struct {
	configFile  string
	inbound     string
	app         string
	appProtocol string
	service     string
	upstreams   multiFlag
	httpProxy   string
	policyDir   string
	// What the enforcer makes of request bodies, as writ-enforcer's
	// flags of the same names.
	maxBodyBytes int
	protoDescs   string
	// maxHeldTotal bounds the bodies held for checks, all requests
	// together.
	maxHeldTotal int64
	// watchAfter is proxy.Options.WatchClientAfter.
	watchAfter time.Duration
	// Policy from writd's bundle service instead of --policy-dir.
	policyBundle   string
	policyServerID string
	policyPoll     time.Duration
	spiffeID       string
	accessLog      string
	drainTimeout   time.Duration
	audit          audit.RecorderOptions
	otlpEndpoint   string
	otlpProtocol   string
	otlpCA         string
	otlpCert       string
	otlpKey        string
	otlpTimeout    time.Duration
	otlpCompress   string
	sampleRatio    float64

	// ADS: writd configures the proxy.
	xdsServer     string
	xdsServerID   string
	nodeID        string
	namespace     string
	labels        string
	version       string
	outboundPorts bool
	appCheck      time.Duration
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func (o *proxyOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.xdsServer, "xds-server", "", "writd's gRPC address, host:port: the proxy is configured over ADS (the production path)")
	fs.StringVar(&o.xdsServerID, "xds-server-id", "", "SPIFFE ID writd must present on --xds-server (default spiffe://TRUST_DOMAIN/writ/control-plane)")
	fs.StringVar(&o.nodeID, "node-id", "", "xDS node id, unique per workload instance (default SERVICE.NAMESPACE~HOST~ADDRESS)")
	fs.StringVar(&o.namespace, "namespace", "", "the workload's namespace, sent to writd (default: the SVID's)")
	fs.StringVar(&o.labels, "labels", "", "workload labels sent to writd, k=v,k2=v2 (subsets select by them)")
	fs.StringVar(&o.version, "version", "", "shorthand for the label version=VERSION")
	fs.DurationVar(&o.appCheck, "app-check-interval", 5*time.Second, "with --xds-server and --inbound, how often the app is probed (TCP); writd takes the workload out of its peers' endpoints while the app is down (0: no checks)")
	fs.BoolVar(&o.outboundPorts, "outbound-ports", false, "with --xds-server, also bind writd's per-port outbound listeners on 127.0.0.1:PORT, as Envoy does")
	fs.StringVar(&o.configFile, "proxy-config", "", "static proxy configuration (YAML: inbound, outbound, routes, clusters), for tests without writd; not with --xds-server")
	fs.StringVar(&o.inbound, "inbound", "", "mesh port terminating mTLS for the local app, host:port (with --xds-server, the address peers reach it at, registered with writd)")
	fs.StringVar(&o.app, "app", "", "the local application's host:port (with --inbound; with --xds-server on 127.0.0.1)")
	fs.StringVar(&o.appProtocol, "app-protocol", "http1", "how HTTP reaches the app: http1 or h2c (gRPC always uses h2c; static configuration only)")
	fs.StringVar(&o.service, "service", "", "the local service's name, given to policy (with --inbound; with --xds-server, default the SVID's service account)")
	fs.Var(&o.upstreams, "upstream", "NAME=HOST:PORT: a local plaintext port for cluster NAME, or with --xds-server for the service NAME (repeatable)")
	fs.StringVar(&o.httpProxy, "http-proxy", "", "HTTP proxy port, host:port: apps set HTTP_PROXY and call http://SERVICE/...")
	fs.StringVar(&o.policyDir, "policy-dir", "", "Rego policy directory deciding inbound requests; without it (or --policy-bundle) every inbound request is denied")
	fs.StringVar(&o.policyBundle, "policy-bundle", "", "OPA bundle URL polled for the policy deciding inbound requests, e.g. https://writd:8443/bundles/mesh (mTLS with the workload's SVID; the proxy starts once the first bundle is in); not with --policy-dir")
	fs.StringVar(&o.policyServerID, "policy-bundle-server-id", "", "SPIFFE ID the https --policy-bundle server must present (default spiffe://TRUST_DOMAIN/writ/control-plane)")
	fs.DurationVar(&o.policyPoll, "policy-bundle-poll", 10*time.Second, "how often --policy-bundle is polled (If-None-Match: unchanged bundles are not downloaded)")
	fs.IntVar(&o.maxBodyBytes, "max-body-bytes", enforcer.DefaultMaxBodyBytes, "largest request body parsed into input.parsed_body (bodies reach policy when writd's ext_authz asks for them: AuthorizationPolicy requestBody)")
	fs.Int64Var(&o.maxHeldTotal, "max-held-body-bytes-total", proxy.DefaultMaxHeldBodyBytesTotal, "bytes of request bodies held for their policy check (AuthorizationPolicy requestBody) by all requests together; a request that would take the total over it is answered 503")
	fs.DurationVar(&o.watchAfter, "watch-client-after", proxy.DefaultWatchClientAfter, "how long an HTTP/1.1 request waits for its answer before its client's connection is watched, so that a client gone away cancels the request upstream (and at the app); requests answered sooner cost nothing for it")
	fs.StringVar(&o.protoDescs, "proto-descriptors", "", "FileDescriptorSet (protoc --descriptor_set_out --include_imports) to decode gRPC request messages into input.parsed_body (requestBody with packAsBytes)")
	fs.StringVar(&o.spiffeID, "spiffe-id", "", "the SVID the proxy uses when the Workload API serves several (default: the first)")
	fs.StringVar(&o.accessLog, "access-log", "-", `access log file ("-": stdout, "": none)`)
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 10*time.Second, "how long in-flight requests may finish after SIGTERM")
	o.audit.RegisterFlags(fs) // --audit-collector defaults to --control-plane
	fs.StringVar(&o.otlpEndpoint, "otlp-endpoint", "", "OTLP traces endpoint receiving a span per sampled request: for http/protobuf a URL, e.g. http://collector:4318/v1/traces; for grpc the collector's address, e.g. http://collector:4317 (plaintext) or https://... (TLS) (default: from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT, + /v1/traces for http/protobuf; none: no export)")
	fs.StringVar(&o.otlpCA, "otlp-ca-file", "", "PEM CA certificates the https:// OTLP collector is verified against, replacing the system roots (default: OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE, else OTEL_EXPORTER_OTLP_CERTIFICATE)")
	fs.StringVar(&o.otlpCert, "otlp-client-cert", "", "PEM client certificate presented to the OTLP collector (mTLS), with --otlp-client-key (default: OTEL_EXPORTER_OTLP_[TRACES_]CLIENT_CERTIFICATE)")
	fs.StringVar(&o.otlpKey, "otlp-client-key", "", "PEM private key of --otlp-client-cert (default: OTEL_EXPORTER_OTLP_[TRACES_]CLIENT_KEY)")
	fs.DurationVar(&o.otlpTimeout, "otlp-timeout", 0, "bound on one OTLP export (default: OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT in milliseconds, else 10s); headers, e.g. an API key, come only from OTEL_EXPORTER_OTLP_[TRACES_]HEADERS, never a flag (a command line is visible to every local user)")
	fs.StringVar(&o.otlpCompress, "otlp-compression", "", "compression of OTLP exports: gzip (the HTTP body, with Content-Encoding: gzip; each gRPC message, with grpc-encoding: gzip) or none (default: OTEL_EXPORTER_OTLP_TRACES_COMPRESSION, else OTEL_EXPORTER_OTLP_COMPRESSION, else none)")
	fs.StringVar(&o.otlpProtocol, "otlp-protocol", "", "OTLP transport: http/protobuf or grpc (default: from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf)")
	fs.Float64Var(&o.sampleRatio, "trace-sample-ratio", 1, "share (0 to 1) of new traces to export; a request arriving with a traceparent keeps its sampled flag; unsampled traces still propagate traceparent (flags 00) and keep their trace_id in the access log")
}

// otlpTransport is --otlp-protocol, else OpenTelemetry's environment, else
// http/protobuf.
func (o *proxyOptions) otlpTransport() (string, error) {
	p := o.otlpProtocol
	if p == "" {
		p = os.Getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	}
	if p == "" {
		p = os.Getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch p {
	case "", proxy.OTLPProtocolHTTP:
		return proxy.OTLPProtocolHTTP, nil
	case proxy.OTLPProtocolGRPC:
		return p, nil
	}
	return "", fmt.Errorf("otlp protocol %q: want %s or %s", p, proxy.OTLPProtocolHTTP, proxy.OTLPProtocolGRPC)
}

// tracing resolves where spans go, as OpenTelemetry's SDKs read their
// environment, and the service.name they carry (OTEL_SERVICE_NAME, else
// --service, else writ-proxy).
func (o *proxyOptions) tracing() (url, service string, err error) {
	proto, err := o.otlpTransport()
	if err != nil {
		return "", "", err
	}
	target := proxy.OTLPTracesURL
	if proto == proxy.OTLPProtocolGRPC {
		target = proxy.OTLPGRPCTarget
	}
	if o.otlpEndpoint != "" {
		url, err = target("", o.otlpEndpoint)
	} else {
		url, err = target(os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT"), os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
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
	return o.xdsServer != "" || o.configFile != "" || o.inbound != "" || len(o.upstreams) > 0 || o.httpProxy != ""
}

// config assembles the static configuration from the file and the flags;
// with --xds-server it only checks the flags, and writd configures the
// proxy.
func (o *proxyOptions) config() (*proxy.Config, error) {
	if err := o.checkPolicy(); err != nil {
		return nil, err
	}
	if o.xdsServer != "" {
		return nil, o.checkXDS()
	}
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

// checkPolicy checks where policy comes from.
func (o *proxyOptions) checkPolicy() error {
	if o.maxBodyBytes < 0 {
		return errors.New("--max-body-bytes must not be negative")
	}
	if o.maxHeldTotal <= 0 {
		return errors.New("--max-held-body-bytes-total must be positive")
	}
	if o.watchAfter <= 0 {
		return errors.New("--watch-client-after must be positive")
	}
	if o.policyBundle == "" {
		return nil
	}
	if o.policyDir != "" {
		return errors.New("--policy-dir and --policy-bundle exclude each other")
	}
	if _, err := bundlefetch.CheckURL(o.policyBundle); err != nil {
		return fmt.Errorf("--policy-bundle: %w", err)
	}
	if o.policyPoll <= 0 {
		return errors.New("--policy-bundle-poll must be positive")
	}
	if o.policyServerID != "" {
		if _, err := spiffeid.FromString(o.policyServerID); err != nil {
			return fmt.Errorf("--policy-bundle-server-id: %w", err)
		}
	}
	return nil
}

// checkXDS checks the flags of the ADS path before anything starts.
func (o *proxyOptions) checkXDS() error {
	if o.configFile != "" {
		return errors.New("--proxy-config and --xds-server exclude each other: writd configures the proxy")
	}
	if (o.inbound == "") != (o.app == "") {
		return errors.New("--inbound and --app go together")
	}
	if o.xdsServerID != "" {
		if _, err := spiffeid.FromString(o.xdsServerID); err != nil {
			return fmt.Errorf("--xds-server-id: %w", err)
		}
	}
	if _, err := o.upstreamList(); err != nil {
		return err
	}
	_, err := o.labelMap()
	return err
}

func (o *proxyOptions) upstreamList() ([]xdsclient.Upstream, error) {
	var out []xdsclient.Upstream
	for _, u := range o.upstreams {
		name, addr, ok := strings.Cut(u, "=")
		if !ok || name == "" || addr == "" {
			return nil, fmt.Errorf("--upstream %q: want NAME=HOST:PORT", u)
		}
		out = append(out, xdsclient.Upstream{Name: name, Address: addr})
	}
	return out, nil
}

func (o *proxyOptions) labelMap() (map[string]string, error) {
	m := map[string]string{}
	if o.labels != "" {
		for _, kv := range strings.Split(o.labels, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || k == "" {
				return nil, fmt.Errorf("--labels %q: want k=v,k2=v2", o.labels)
			}
			m[k] = v
		}
	}
	if o.version != "" {
		m["version"] = o.version
	}
	return m, nil
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
	sink     *spoolSink // nil without --audit-spool-dir
	xds      atomic.Pointer[xdsclient.Client]

	// With --policy-bundle: closed once fetchPolicy has made the enforcer
	// from the first bundle; RunPolicy then polls with fetcher.
	bundleReady   chan struct{}
	waitingPolicy atomic.Bool
	fetcher       *bundlefetch.Fetcher
	bundleDir     string

	// Enforcers of the decisions AuthorizationPolicies bind on inbound
	// listeners, other than the policy's own: engines over the same
	// source, reloaded with it (set with the enforcer).
	policySrc policy.Options
	binder    atomic.Pointer[enforcer.Binder]
}

// enforcerFor is the enforcer of decision (proxy.Options.EnforcerFor),
// one query or several joined by "," (every one must allow), with
// dryRun's queries evaluated beside it and recorded, never enforced:
// engines
// over the same policy source with those decision paths, made once and
// reloaded whenever the policy's own engine takes new content.
func (r *proxyRole) enforcerFor(decision, dryRun string) (*enforcer.Enforcer, error) {
	b := r.binder.Load()
	if b == nil {
		return nil, errors.New("no policy loaded")
	}
	e, err := b.For(context.Background(), decision, dryRun)
	if err == nil {
		r.log.Info("policy decision bound by AuthorizationPolicies", "decision", decision, "dry_run", dryRun)
	}
	return e, err
}

// reloadOthers reloads the engines of other decisions after the policy's
// own engine took new content; each keeps its last good set on error.
// The inbound listeners then resolve their bindings again: one bound
// while its dry-run rule was missing would otherwise keep recording that
// error until writd happened to change its configuration.
// Last, the xDS client tries again the configuration it last refused.
func (r *proxyRole) reloadOthers(ctx context.Context) {
	if b := r.binder.Load(); b != nil {
		if err := b.Reload(ctx); err != nil {
			r.log.Warn("policy reload for a bound decision", "err", err)
		}
	}
	if p := r.running.Load(); p != nil {
		if err := p.Rebind(); err != nil {
			r.log.Warn("policy reload: an inbound listener keeps its binding", "err", err)
		}
	}
	// A configuration refused for binding a rule the policy lacked may
	// bind now; writd does not send a refused version again.
	if c := r.xds.Load(); c != nil {
		c.RetryRefused()
	}
}

// reloadAll reloads the policy's own engine, then the others.
func (r *proxyRole) reloadAll(ctx context.Context) error {
	err := r.engine.Reload(ctx)
	r.reloadOthers(ctx)
	return err
}

// ServeHTTP serves the proxy's admin paths (/metrics, /config_dump,
// /debug/pprof/) once it runs; before that, only its metrics.
func (r *proxyRole) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if c := r.xds.Load(); c != nil && req.URL.Path == "/config_dump" && req.Method == http.MethodGet {
		// Over ADS: writd's resources in force, the client's state (the
		// last NACK's reason) and what the proxy made of them.
		b, err := c.Dump()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
		return
	}
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
	if traces, _, err := o.tracing(); err != nil {
		return nil, err
	} else if traces != "" {
		x, err := o.otlpExport(os.Getenv)
		if err != nil {
			return nil, err
		}
		if x.TLS != nil && !strings.HasPrefix(traces, "https://") {
			return nil, fmt.Errorf("otlp endpoint %q: a CA or client certificate is set, but the endpoint is not https://", traces)
		}
	}
	if _, err := proxy.NewTraceSampler(o.sampleRatio); err != nil {
		return nil, err
	}
	r := &proxyRole{o: o, cfg: cfg, sock: sock, reg: prometheus.NewRegistry(), log: log, stdout: stdout}
	r.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "writ_executable_faults_confined",
			Help: "1 if the last trim of the executable's start-up pages left fault-around off in its mappings (--confine-executable-faults took, or --split-executable-mappings), 0 if not (refused by the kernel or seccomp, turned off, or no trim).",
		}, func() float64 {
			if executableFaultsConfined.Load() {
				return 1
			}
			return 0
		}))
	if o.audit.Enabled() {
		name := "dir:" + o.policyDir
		if o.policyBundle != "" {
			name = "bundle:" + o.policyBundle
		}
		r.sink = &spoolSink{log: log, policy: name}
	}
	switch {
	case o.policyDir != "":
		if err := r.newEnforcer(ctx, policy.Options{Dir: o.policyDir}); err != nil {
			return nil, err
		}
	case o.policyBundle != "":
		// The bundle is fetched with the workload's SVID, which Run
		// waits for: the enforcer is made there.
		r.bundleReady = make(chan struct{})
	default:
		log.Warn("no --policy-dir or --policy-bundle: every inbound request will be denied")
	}
	return r, nil
}

// newEnforcer loads the policy of popts and makes the in-process enforcer
// deciding inbound requests.
func (r *proxyRole) newEnforcer(ctx context.Context, popts policy.Options) error {
	log := r.log
	popts.Logger = log
	r.policySrc = popts
	popts.OnReload = func(ev policy.ReloadEvent) {
		if r.sink != nil {
			r.sink.onReload(ev)
		}
		// With --policy-dir the engine polls the directory itself; the
		// engines of other decisions follow it. (With --policy-bundle
		// the fetcher reloads them all.)
		if ev.Err == nil && r.o.policyDir != "" {
			r.reloadOthers(context.Background())
		}
	}
	eng, err := policy.NewEngine(ctx, popts)
	if err != nil {
		return fmt.Errorf("load policy: %w", err)
	}
	m, err := enforcer.NewMetrics(r.reg)
	if err != nil {
		return err
	}
	var sink enforcer.Sink
	if r.sink != nil {
		sink = r.sink
	} else {
		// Without a spool, decisions go to the log: never
		// unrecorded, but not the durable audit trail.
		log.Warn("no --audit-spool-dir: decisions go to the log only, which is not the durable audit trail")
		sink = enforcer.SinkFunc(func(_ context.Context, d enforcer.Decision) error {
			log.Info("decision", "decision_id", d.ID, "source", d.Source, "method", d.Method, "path", d.Path,
				"result", d.Result, "status", d.HTTPStatus, "cause", d.Cause, "policy_revision", d.PolicyRevision, "trace_id", d.TraceID)
			return nil
		})
	}
	var protos *protoregistry.Files
	if r.o.protoDescs != "" {
		if protos, err = enforcer.LoadProtoDescriptors(r.o.protoDescs); err != nil {
			return err
		}
	}
	eopts := enforcer.Options{Engine: eng, Sink: sink, Metrics: m, Logger: log, MaxBodyBytes: r.o.maxBodyBytes, ProtoDescriptors: protos}
	if r.enforcer, err = enforcer.New(eopts); err != nil {
		return err
	}
	src := r.policySrc
	r.binder.Store(enforcer.NewBinder(eopts, func(ctx context.Context, decision string) (*policy.Engine, error) {
		popts := src
		popts.DecisionPath, popts.OnReload = decision, nil // reloads are recorded once, by the policy's own engine
		return policy.NewEngine(ctx, popts)
	}))
	r.engine = eng
	return nil
}

// fetchPolicy waits for the first bundle of --policy-bundle, fetched over
// mTLS with the workload's SVID, and makes the enforcer from it. Until it
// returns the proxy is not started: no inbound request is served, let
// alone allowed, without a policy (fail closed), and /readyz says why.
func (r *proxyRole) fetchPolicy(ctx context.Context, src *workloadapi.X509Source, td spiffeid.TrustDomain) error {
	https, err := bundlefetch.CheckURL(r.o.policyBundle)
	if err != nil {
		return err
	}
	var tlsCfg *tls.Config
	if https {
		want, err := spiffeid.FromSegments(td, "writ", "control-plane")
		if r.o.policyServerID != "" {
			want, err = spiffeid.FromString(r.o.policyServerID)
		}
		if err != nil {
			return fmt.Errorf("--policy-bundle-server-id: %w", err)
		}
		tlsCfg = svidtls.ClientConfig(src, src, svidtls.AuthorizeID(want), clockwork.NewRealClock())
	}
	dir, err := os.MkdirTemp("", "writ-proxy-bundle-")
	if err != nil {
		return fmt.Errorf("bundle cache dir: %w", err)
	}
	f := bundlefetch.New(bundlefetch.Options{URL: r.o.policyBundle, Dir: dir, Interval: r.o.policyPoll, TLS: tlsCfg, Log: r.log.With("component", "bundle")})
	r.waitingPolicy.Store(true)
	defer r.waitingPolicy.Store(false)
	// The sidecar waits for writd as long as it takes, as it does for its
	// first configuration: exiting would only restart the wait.
	if err := f.First(ctx, 0); err != nil {
		os.RemoveAll(dir)
		return err
	}
	if err := r.newEnforcer(ctx, policy.Options{Bundle: f.File()}); err != nil {
		// A first bundle that does not load is not retried blindly: the
		// next poll may bring a good one, but the proxy must not start
		// without a policy, so this is fatal and the supervisor says so.
		os.RemoveAll(dir)
		return err
	}
	r.fetcher, r.bundleDir = f, dir
	close(r.bundleReady)
	return nil
}

// RunPolicy reloads --policy-dir when it changes, or polls
// --policy-bundle once its first bundle is in (a bad policy never
// replaces the running one: the last good one stays), until ctx ends.
func (r *proxyRole) RunPolicy(ctx context.Context) error {
	if r.bundleReady != nil {
		select {
		case <-ctx.Done():
			return nil
		case <-r.bundleReady:
		}
		defer os.RemoveAll(r.bundleDir)
		return r.fetcher.Run(ctx, r.reloadAll)
	}
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
		if r.waitingPolicy.Load() {
			return fmt.Errorf("proxy not started: waiting for the first policy bundle from %s", r.o.policyBundle)
		}
		if c := r.xds.Load(); c != nil {
			msg := "proxy not started: no configuration from writd yet"
			if st := c.Status(); st.LastError != "" {
				msg += " (" + st.LastError + ")"
			}
			return errors.New(msg)
		}
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
	if r.bundleReady != nil {
		svid, err := src.GetX509SVID()
		if err != nil {
			return fmt.Errorf("svid: %w", err)
		}
		if err := r.fetchPolicy(ctx, src, svid.ID.TrustDomain()); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
	if r.sink != nil {
		svid, err := src.GetX509SVID()
		if err != nil {
			return fmt.Errorf("svid: %w", err)
		}
		rec, err := r.openAudit(src, svid.ID)
		if err != nil {
			return err
		}
		defer rec.Close()
		sctx, stopShipper := context.WithCancel(context.Background())
		shipped := make(chan struct{})
		go func() { _ = rec.Run(sctx); close(shipped) }()
		// The shipper outlives the drain, so that the last decisions
		// are sent if writd is reachable; what is not stays spooled.
		defer func() { stopShipper(); <-shipped }()
	}
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
	proto, err := r.o.otlpTransport()
	if err != nil {
		return err
	}
	sampler, err := proxy.NewTraceSampler(r.o.sampleRatio)
	if err != nil {
		return err
	}
	var export proxy.OTLPExport
	if traces != "" {
		if export, err = r.o.otlpExport(os.Getenv); err != nil {
			return err
		}
	}
	popts := proxy.Options{Source: src, Enforcer: r.enforcer, EnforcerFor: r.enforcerFor, Registry: r.reg, AccessLog: alog, DrainTimeout: r.o.drainTimeout, Log: r.log,
		OTLPTracesURL: traces, OTLPProtocol: proto, OTLP: export, TraceSampler: sampler, ServiceName: service,
		MaxHeldBodyBytesTotal: r.o.maxHeldTotal, WatchClientAfter: r.o.watchAfter}
	if r.o.xdsServer != "" {
		return r.runXDS(ctx, src, popts)
	}
	p, err := proxy.New(r.cfg, popts)
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

// runXDS is the production path: writd configures the proxy over ADS.
// The proxy starts with the first configuration writd sends, takes every
// later one with Update, and keeps the one in force while writd is
// unreachable.
func (r *proxyRole) runXDS(ctx context.Context, src proxy.Source, popts proxy.Options) error {
	svid, err := src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("svid: %w", err)
	}
	node, local, serverID, err := r.o.xdsNode(svid.ID)
	if err != nil {
		return err
	}
	started := make(chan *proxy.Proxy, 1)
	apply := func(cfg *proxy.Config) error {
		if p := r.running.Load(); p != nil {
			return p.Update(cfg)
		}
		p, err := proxy.New(cfg, popts)
		if err != nil {
			return err
		}
		h := p.AdminHandler(nil)
		r.admin.Store(&h)
		r.running.Store(p)
		started <- p
		return nil
	}
	var check xdsclient.AppCheck
	if r.o.inbound != "" {
		check.Interval = r.o.appCheck
	}
	c, err := xdsclient.New(xdsclient.Options{Server: r.o.xdsServer, ServerID: serverID, Source: src, Node: node, Local: local,
		Apply: apply, AppCheck: check, Log: r.log.With("component", "xds"), Metrics: r.reg})
	if err != nil {
		return err
	}
	r.xds.Store(c)
	r.log.Info("proxy waiting for its configuration from writd", "xds_server", r.o.xdsServer, "xds_server_id", serverID.String(), "node_id", node.GetId(), "spiffe_id", svid.ID.String())
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cdone := make(chan error, 1)
	go func() { cdone <- c.Run(cctx) }()
	var p *proxy.Proxy
	select {
	case p = <-started:
	case <-ctx.Done():
		cancel()
		<-cdone
		if p := r.running.Load(); p != nil {
			p.Close()
		}
		return nil
	}
	r.log.Info("proxy serving", "spiffe_id", svid.ID.String(), "version", c.Status().Version)
	err = p.Run(ctx)
	cancel()
	<-cdone
	return err
}

// xdsNode is what writ-proxy tells writd about itself, from the flags
// and its SVID (spiffe://TD/ns/NAMESPACE/sa/SERVICE).
func (o *proxyOptions) xdsNode(id spiffeid.ID) (*corev3.Node, xdsclient.Local, spiffeid.ID, error) {
	var local xdsclient.Local
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) != 4 || segs[0] != "ns" || segs[2] != "sa" {
		return nil, local, spiffeid.ID{}, fmt.Errorf("svid %s is not a workload identity (spiffe://TD/ns/NS/sa/SA): writd configures workloads only", id)
	}
	ns, sa := segs[1], segs[3]
	if o.namespace != "" && o.namespace != ns {
		return nil, local, spiffeid.ID{}, fmt.Errorf("--namespace %q: the SVID %s is in namespace %q", o.namespace, id, ns)
	}
	service := ""
	if o.inbound != "" {
		service = o.service
		if service == "" {
			service = sa
		}
		if service != sa {
			return nil, local, spiffeid.ID{}, fmt.Errorf("--service %q: the SVID %s may only serve %q", service, id, sa)
		}
	}
	labels, err := o.labelMap()
	if err != nil {
		return nil, local, spiffeid.ID{}, err
	}
	ups, err := o.upstreamList()
	if err != nil {
		return nil, local, spiffeid.ID{}, err
	}
	nodeID := o.nodeID
	if nodeID == "" {
		host, _ := os.Hostname()
		where := o.inbound
		if where == "" {
			where = o.httpProxy
		}
		if where == "" && len(ups) > 0 {
			where = ups[0].Address
		}
		if where == "" {
			where = strconv.Itoa(os.Getpid())
		}
		name := service
		if name == "" {
			name = sa
		}
		nodeID = fmt.Sprintf("%s.%s~%s~%s", name, ns, host, where)
	}
	node, err := xdsclient.Node(xdsclient.NodeOptions{ID: nodeID, Namespace: ns, Service: service, Inbound: o.inbound, App: o.app, Labels: labels})
	if err != nil {
		return nil, local, spiffeid.ID{}, err
	}
	serverID := spiffeid.RequireFromPath(id.TrustDomain(), "/writ/control-plane")
	if o.xdsServerID != "" {
		if serverID, err = spiffeid.FromString(o.xdsServerID); err != nil {
			return nil, local, spiffeid.ID{}, fmt.Errorf("--xds-server-id: %w", err)
		}
	}
	local = xdsclient.Local{Service: service, OutboundPorts: o.outboundPorts, HTTPProxy: o.httpProxy, Upstreams: ups}
	if local.Service == "" {
		local.Service = sa
	}
	return node, local, serverID, nil
}
