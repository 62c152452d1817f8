// Command writ-proxy is Writ's sidecar. It runs the node agent role (it
// attests to writd with a join token, keeps this node's SVIDs fresh, and
// serves the SPIFFE Workload API on a unix socket) and, when listeners are
// configured, the proxy role: the data plane of package proxy, taking its
// SVID from the agent's Workload API.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/authority/agent"
	"github.com/writmesh/writ/internal/cliflags"
	taskrun "github.com/writmesh/writ/internal/run"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `writ-proxy: Writ's sidecar (node agent and proxy).

It attests this node to writd with a one-time join token, keeps an X.509
SVID for every registration entry of the node (keys never leave this
process), renews them at half life, and serves the SPIFFE Workload API on
a unix socket. Workloads are identified by their unix peer credentials
(uid, gid, binary path), not by file permissions.

With --xds-server it also proxies, configured by writd over ADS: it
registers the workload (--inbound, --app, --version/--labels), takes the
listeners, routes, clusters and endpoints writd sends, ACKs what it
applies, NACKs with the reason what it cannot, and keeps the last good
configuration while writd is unreachable. The inbound mesh port
terminates mTLS with the workload's SVID and decides every request with
the Rego policies of --policy-dir, or of the bundle --policy-bundle
polls from writd's bundle service over mTLS (the proxy starts once the
first bundle is in; a bad bundle never replaces the last good one; with
neither, deny all); --http-proxy and
--upstream ports carry the app's plaintext to peer sidecars over mTLS
HTTP/2. --proxy-config (static YAML) is for tests without writd.

Usage:
  WRIT_JOIN_TOKEN=... writ-proxy --control-plane writd.example:8443 \
    --trust-domain example.org --trust-bundle /etc/writ/bundle.json \
    --xds-server writd.example:8443 --inbound 10.0.0.5:15006 \
    --app 127.0.0.1:8080 --version v1 --http-proxy 127.0.0.1:15001 \
    --policy-dir /etc/writ/policies

Flags:
`

// shutdownTimeout bounds graceful shutdown of the admin server, and
// shutdownGrace that of the whole process.
const (
	shutdownTimeout = 5 * time.Second
	shutdownGrace   = 10 * time.Second
)

type options struct {
	trimPages     bool
	splitPages    bool
	noFaultAround bool
	gcPercent     int
	gcPercentSet  bool
	controlPlane  string
	joinToken     string
	trustBundle   string
	trustDomain   string
	workloadAPI   string
	adminAddr     string
	logLevel      string
	syncInterval  time.Duration
	proxy         proxyOptions
}

func parseFlags(args []string, stdout, stderr io.Writer) (*options, int) {
	var o options
	fs := flag.NewFlagSet("writ-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.controlPlane, "control-plane", "", "writd node API address, host:port (required)")
	fs.StringVar(&o.joinToken, "join-token", "", "one-time join token; prefer the WRIT_JOIN_TOKEN environment variable, which other users cannot read in the process list")
	fs.StringVar(&o.trustBundle, "trust-bundle", "", "bootstrap trust bundle file: SPIFFE bundle JSON (as served by writd's /bundle) or PEM certificates (required)")
	fs.StringVar(&o.trustDomain, "trust-domain", "", "the mesh's trust domain, e.g. example.org (required)")
	fs.StringVar(&o.workloadAPI, "workload-api", "unix:///tmp/writ/agent.sock", "Workload API socket address; the directory is created if missing")
	fs.StringVar(&o.adminAddr, "admin-addr", "127.0.0.1:15000", "admin HTTP address (keep it on loopback): /healthz, /readyz and, with the proxy role, /metrics, /config_dump and /debug/pprof/")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&o.trimPages, "trim-startup-pages", true, "drop the executable's pages that start-up touched (at start and once the proxy is ready); those still needed are re-read from the page cache")
	fs.BoolVar(&o.splitPages, "split-executable-mappings", false, "with --trim-startup-pages, map the executable page by page (a VMA per page: ~10,000 of them, ~2 MiB of unshared kernel memory) so that a touched page does not bring the 64 KiB around it. Off by default: Linux 6.7 and later turn fault-around off for the executable without it (through a userfaultfd); for older kernels, or where seccomp refuses userfaultfd, and then only with one sidecar per node, as those executable pages are shared by every writ-proxy on the node while the VMAs are not")
	fs.BoolVar(&o.noFaultAround, "confine-executable-faults", true, "with --trim-startup-pages, ask the kernel not to map the 64 KiB around each page of the executable touched after the trim (Linux 6.7 and later, through a userfaultfd that never reports anything): 4-7 MiB of the executable resident instead of 13-18. Where userfaultfd is refused (older kernels; containers' default seccomp profiles, Docker's and Kubernetes' RuntimeDefault, answer EPERM) it says so once at start and nothing else changes; set it to false only where a seccomp profile kills the process for the call")
	fs.IntVar(&o.gcPercent, "gc-percent", defaultGCPercent, "heap growth between garbage collections, in percent of the live heap, as GOGC (which applies when this flag is not given; negative: off)")
	fs.DurationVar(&o.syncInterval, "sync-interval", agent.DefaultSyncInterval, "how often registration entries are fetched from writd")
	o.proxy.register(fs)
	if done, code := cliflags.Parse(fs, "writ-proxy", usage, args, stdout, stderr); done {
		return nil, code
	}
	fs.Visit(func(f *flag.Flag) { o.gcPercentSet = o.gcPercentSet || f.Name == "gc-percent" })
	if o.joinToken == "" {
		o.joinToken = os.Getenv("WRIT_JOIN_TOKEN")
	}
	var missing []string
	for _, m := range []struct{ name, val string }{
		{"--control-plane", o.controlPlane},
		{"--join-token or WRIT_JOIN_TOKEN", o.joinToken},
		{"--trust-bundle", o.trustBundle},
		{"--trust-domain", o.trustDomain},
	} {
		if m.val == "" {
			missing = append(missing, m.name)
		}
	}
	if len(missing) > 0 {
		fmt.Fprintf(stderr, "writ-proxy: missing %s (see --help)\n", strings.Join(missing, ", "))
		return nil, 2
	}
	if o.proxy.audit.Collector == "" {
		o.proxy.audit.Collector = o.controlPlane // writd's gRPC port serves the collector too
	}
	return &o, -1
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log-level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

// run is writ-proxy's whole life: parse, wire, serve until ctx ends.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, code := parseFlags(args, stdout, stderr)
	if o == nil {
		return code
	}
	if pct, ok := gcPercent(o, os.Getenv); ok {
		debug.SetGCPercent(pct)
	}
	level, err := parseLevel(o.logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "writ-proxy: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	faultAroundReported := false
	if o.trimPages {
		faultAroundReported = trimAndReport(o.trimMode(), false, log)
	}
	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		log.Error("bad --trust-domain", "error", err)
		return 2
	}
	bundle, err := agent.LoadTrustBundle(o.trustBundle, td)
	if err != nil {
		log.Error("load trust bundle", "error", err)
		return 1
	}
	a, err := agent.New(agent.Config{
		ControlPlane: o.controlPlane,
		JoinToken:    o.joinToken,
		TrustDomain:  td,
		TrustBundle:  bundle,
		SyncInterval: o.syncInterval,
		Log:          log,
	})
	if err != nil {
		log.Error("configure agent", "error", err)
		return 2
	}
	wl, sockPath, err := agent.ListenUnix(o.workloadAPI)
	if err != nil {
		log.Error("listen for the workload api", "error", err)
		return 1
	}
	defer os.Remove(sockPath)
	adminL, err := net.Listen("tcp", o.adminAddr)
	if err != nil {
		wl.Close()
		log.Error("listen for admin", "error", err)
		return 1
	}
	log.Info("writ-proxy starting", "control_plane", o.controlPlane, "trust_domain", td.Name(), "workload_api", o.workloadAPI, "admin_addr", adminL.Addr().String())

	var role *proxyRole
	if o.proxy.enabled() {
		if role, err = newProxyRole(ctx, &o.proxy, o.workloadAPI, stdout, log); err != nil {
			adminL.Close()
			wl.Close()
			log.Error("configure proxy", "error", err)
			return 2
		}
	}
	if role != nil && o.trimPages {
		go trimWhenReady(ctx, role.Ready, o.trimMode(), faultAroundReported, log)
	}
	admin := &http.Server{Handler: adminMux(a, role), ReadHeaderTimeout: 5 * time.Second}
	tasks := []taskrun.Task{
		taskrun.Task{Name: "agent", Run: a.Run},
		taskrun.Task{Name: "workload api", Run: func(ctx context.Context) error { return a.Serve(ctx, wl) }},
		taskrun.Task{Name: "admin", Run: func(ctx context.Context) error {
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
	if role != nil {
		tasks = append(tasks, taskrun.Task{Name: "proxy", Run: role.Run}, taskrun.Task{Name: "policy", Run: role.RunPolicy})
	}
	err = taskrun.Group(ctx, shutdownGrace+o.proxy.drainTimeout, tasks...)
	if err != nil {
		log.Error("writ-proxy stopped", "error", err)
		return 1
	}
	log.Info("writ-proxy stopped")
	return 0
}

// adminMux serves liveness and readiness. Ready means a node SVID and a
// first entry sync (before that the Workload API has nothing to give) and,
// with the proxy role, a proxy serving with a valid SVID. The proxy's
// /metrics, /config_dump and /debug/pprof/ are served here too.
func adminMux(a *agent.Agent, role *proxyRole) *http.ServeMux {
	mux := http.NewServeMux()
	if role != nil {
		mux.Handle("/", role)
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !a.Ready() {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, "not ready: no node SVID or no entry sync yet\n")
			return
		}
		if role != nil {
			if err := role.Ready(); err != nil {
				w.WriteHeader(http.StatusServiceUnavailable)
				io.WriteString(w, "not ready: "+err.Error()+"\n")
				return
			}
		}
		io.WriteString(w, "ready\n")
	})
	return mux
}

// trimWhenReady drops the start-up pages of the executable once more when
// the proxy is first ready (its policy compiled, its configuration and
// SVID in hand), a second after, so that the steady state starts from the
// pages it uses. It gives up after trimReadyWait.
func trimWhenReady(ctx context.Context, ready func() error, mode trimMode, reported bool, log *slog.Logger) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	deadline := time.Now().Add(trimReadyWait)
	for ready() != nil {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return
		}
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(time.Second):
	}
	trimAndReport(mode, reported, log)
}

// executableFaultsConfined is what the last trim reported, for the
// writ_executable_faults_confined gauge.
var executableFaultsConfined atomic.Bool

// msgFaultAroundOn is logged, once, when --confine-executable-faults
// could not take effect.
const msgFaultAroundOn = "fault-around stays on in the executable's mappings (needs Linux 6.7+ and userfaultfd allowed by seccomp): about 10 MiB more resident"

// trimAndReport trims and says, at Info unless reported is already true,
// that fault-around stays on where the mode asked for it off and the
// kernel refused. It returns whether that has been said.
func trimAndReport(mode trimMode, reported bool, log *slog.Logger) bool {
	n, confined := trimExecutablePages(mode)
	executableFaultsConfined.Store(confined)
	log.Debug("dropped start-up pages", "bytes", n, "fault_around_off", confined)
	if mode.noFaultAround && !mode.split && !confined && n > 0 && !reported {
		// Not an error: the proxy works the same, with ~10 MiB more of
		// its executable resident. Said once so an operator can tell why.
		attrs := []any{}
		if err := faultAroundRefusal(); err != nil {
			attrs = append(attrs, "reason", err.Error())
		}
		log.Info(msgFaultAroundOn, attrs...)
		return true
	}
	return reported
}

const trimReadyWait = 2 * time.Minute

// trimMode says how the executable's mappings are kept from bringing
// back the 64 KiB around each page touched after a trim.
type trimMode struct {
	split         bool // a VMA per page (splitMapping)
	noFaultAround bool // fault-around off (disableFaultAround)
}

func (o *options) trimMode() trimMode {
	return trimMode{split: o.splitPages, noFaultAround: o.noFaultAround}
}

// defaultGCPercent is the sidecar's GOGC. Most of a proxy's heap is
// the same few megabytes from start to end (protobuf registries, the
// compiled policy, TLS state, pooled buffers); what a request allocates
// is short-lived, so at Go's default of 100 the heap between collections
// is about as large again as everything live. At 50 the mesh-side proxy
// of make bench peaks 4-6 MiB lower at 1,000 rps; the GC's background
// work, under 5 % of that proxy's CPU there at 100, runs twice as often
// (alternating runs showed no difference in CPU per request beyond their
// noise).
const defaultGCPercent = 50

// gcPercent is the GC percentage to set, if any: the flag when given,
// else GOGC from the environment (the runtime has applied it already),
// else the sidecar's default.
func gcPercent(o *options, getenv func(string) string) (int, bool) {
	if o.gcPercentSet {
		return o.gcPercent, true
	}
	if getenv("GOGC") != "" {
		return 0, false
	}
	return o.gcPercent, true
}
