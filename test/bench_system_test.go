package test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"
)

// The whole-system benchmark behind `make bench` (docs/proxy.md): one load
// generator (fortio, keep-alive HTTP/1.1, 1 KiB POST bodies echoed back by a
// fortio echo server, 16 connections) against, in one run on this machine,
//
//   - the app directly (the floor),
//   - two writ-proxy processes (agent + proxy each, SVIDs from a real writd
//     on PostgreSQL) with mTLS, Rego authz and the audit spool on,
//   - an nginx pair with mTLS, without and with auth_request to a stock OPA
//     server holding the same rule,
//   - an HAProxy pair with mTLS,
//
// each at a fixed 1,000 requests/s and at saturation. Printed: latency
// added over direct (p50/p90/p99), max throughput, the proxies' CPU seconds
// per 1,000 requests (utime+stime from /proc/PID/stat) and peak RSS per
// proxy during each run (VmHWM, reset before it), with Writ's ratio to
// each peer. For the writ pair also what its audit trail costs the control
// plane on the same cores, which the peers (recording nothing) do not pay:
// CPU seconds of writd and of every PostgreSQL process per 1,000 requests,
// and the collector's batches per second and events per batch (from
// writd's /metrics).
//
// Knobs (environment): WRIT_FORTIO_BIN, WRIT_OPA_BIN, WRIT_NGINX_BIN,
// WRIT_HAPROXY_BIN (default: found on PATH or in /usr/sbin), WRIT_BENCH_DUR
// (per measured run, default 10s), WRIT_BENCH_QPS (the fixed rate, default
// 1000), WRIT_BENCH_CONC (default 16), WRIT_BENCH_ONLY (comma-separated
// scenario names to run, default all), WRIT_BENCH_PROXY_ENV (space-separated
// VAR=value for the writ-proxy processes only, e.g. GOGC=200),
// WRIT_BENCH_PPROF (a directory: system call counts of both writ-proxy
// processes during the writ pair's warm-up, with strace on PATH; CPU
// profiles from their admin ports during each measured run, then
// allocation profiles; /proc/PID/smaps_rollup after each run),
// WRIT_BENCH_TRACE (a directory: an execution trace of both writ-proxy
// processes during the fixed-rate run, front.trace and back.trace, for go
// tool trace; tracing costs some CPU, so figures from such a run are not
// for comparison). Every run
// is bounded by its
// duration; a scenario whose requests fail is reported as a failure.
func BenchmarkSystem(b *testing.B) {
	tools := map[string]string{}
	for name, env := range map[string]string{"fortio": "WRIT_FORTIO_BIN", "opa": "WRIT_OPA_BIN", "nginx": "WRIT_NGINX_BIN", "haproxy": "WRIT_HAPROXY_BIN", "openssl": ""} {
		p := ""
		if env != "" {
			p = os.Getenv(env)
		}
		if p == "" {
			p = lookTool(name)
		}
		if p == "" {
			b.Fatalf("%s not found (set %s; scripts/bench.sh installs it)", name, env)
		}
		tools[name] = p
	}
	// The peers' binaries start from disk too, as writ-proxy's do.
	for _, name := range []string{"opa", "nginx", "haproxy"} {
		coldExecutable(b, tools[name])
	}
	dur := 10 * time.Second
	if s := os.Getenv("WRIT_BENCH_DUR"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 || d > 5*time.Minute {
			b.Fatalf("WRIT_BENCH_DUR=%q: want a duration up to 5m", s)
		}
		dur = d
	}
	qps := envInt(b, "WRIT_BENCH_QPS", 1000)
	conc := envInt(b, "WRIT_BENCH_CONC", 16)
	only := map[string]bool{}
	for _, s := range strings.Split(os.Getenv("WRIT_BENCH_ONLY"), ",") {
		if s = strings.TrimSpace(s); s != "" {
			only[s] = true
		}
	}
	dir, err := os.MkdirTemp("", "writ-bench-")
	if err != nil {
		b.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	sb := &sysBench{b: b, tools: tools, dir: dir, dur: dur, qps: qps, conc: conc}

	app := freeAddr(b)
	sb.start("app", tools["fortio"], "server", "-http-port", app, "-grpc-port", "disabled", "-redirect-port", "disabled", "-loglevel", "Warning")
	waitHTTP(b, "http://"+app+"/", nil)

	scenarios := []struct {
		name  string
		setup func() (url string, sides [][]int)
	}{
		{"direct", func() (string, [][]int) { return "http://" + app + "/", nil }},
		{"writ", func() (string, [][]int) { return sb.writPair(app) }},
		{"nginx", func() (string, [][]int) { return sb.nginxPair(app, false) }},
		{"nginx+opa", func() (string, [][]int) { return sb.nginxPair(app, true) }},
		{"haproxy", func() (string, [][]int) { return sb.haproxyPair(app) }},
	}
	var results []*sysResult
	for _, sc := range scenarios {
		if len(only) > 0 && !only[sc.name] && sc.name != "direct" {
			continue
		}
		url, sides := sc.setup()
		sb.profile = nil
		if dir := os.Getenv("WRIT_BENCH_PPROF"); dir != "" && sc.name == "writ" {
			sb.profile = func(qps int, d time.Duration) func() { return sb.profileWrit(dir, sides, qps, d) }
		}
		res := sb.measure(sc.name, url, sides)
		results = append(results, res)
		sb.stopAll()
		b.Logf("%s: done", sc.name)
	}
	printSystem(os.Stdout, results, qps, conc, dur)
}

// lookTool finds a binary on PATH, in /usr/sbin or in Go's bin directory.
func lookTool(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	cands := []string{"/usr/sbin/" + name}
	if gp, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		cands = append(cands, filepath.Join(strings.TrimSpace(string(gp)), "bin", name))
	}
	for _, c := range cands {
		if fi, err := os.Stat(c); err == nil && fi.Mode()&0o111 != 0 {
			return c
		}
	}
	return ""
}

type sysBench struct {
	b     *testing.B
	tools map[string]string
	dir   string
	dur   time.Duration
	qps   int
	conc  int
	w     *writd
	procs []*exec.Cmd // per scenario; the app stays
	certs *benchCerts
	// admins are the writ pair's admin addresses (front, back), for
	// WRIT_BENCH_PPROF.
	admins []string
	// ctl, when set, samples the control plane's cost (the writ pair).
	ctl func() ctlSample
	// profile, when set, starts profiling a measured run (at qps) of the
	// scenario being measured and returns a function that waits for it.
	profile func(qps int, d time.Duration) func()
}

// start runs a process with its output in a file under dir; it is killed
// by stopAll (scenario processes) or at cleanup (the app).
func (s *sysBench) start(name, bin string, args ...string) *exec.Cmd {
	return s.startEnv(name, nil, bin, args...)
}

func (s *sysBench) startEnv(name string, env []string, bin string, args ...string) *exec.Cmd {
	s.b.Helper()
	f, err := os.Create(filepath.Join(s.dir, name+".log"))
	if err != nil {
		s.b.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		s.b.Fatal(err)
	}
	f.Close()
	if name == "app" {
		s.b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	} else {
		s.procs = append(s.procs, cmd)
		s.b.Cleanup(func() { _ = cmd.Process.Kill() })
	}
	return cmd
}

func (s *sysBench) stopAll() {
	for _, c := range s.procs {
		_ = c.Process.Kill()
		_ = c.Wait()
	}
	s.procs = nil
	s.ctl = nil
}

func (s *sysBench) logOf(name string) string {
	b, _ := os.ReadFile(filepath.Join(s.dir, name+".log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// writPair: writd on PostgreSQL, entries for frontend and orders, and two
// writ-proxy processes: frontend's upstream port → orders' mesh port (mTLS
// HTTP/2) → the app, decided by the Rego policy of --policy-dir.
func (s *sysBench) writPair(app string) (string, [][]int) {
	b := s.b
	if s.w == nil {
		s.w = startWritd(b)
	}
	w := s.w
	exe := filepath.Join(binDir(b), "writ-proxy")
	coldExecutable(b, exe)
	uid := fmt.Sprint(os.Geteuid())
	for node, id := range map[string]string{"orders-node": "spiffe://example.org/ns/shop/sa/orders", "frontend-node": "spiffe://example.org/ns/shop/sa/frontend"} {
		if out, err := writTB(b, w, "entry", "create", "--parent", "spiffe://example.org/node/"+node, "--spiffe-id", id,
			"--selector", "unix:uid:"+uid, "--selector", "unix:path:"+exe); err != nil {
			b.Fatalf("entry create: %v: %s", err, out)
		}
	}
	policyDir := filepath.Join(s.dir, "policy")
	if err := os.MkdirAll(policyDir, 0o755); err != nil {
		b.Fatal(err)
	}
	write(b, filepath.Join(policyDir, "mesh.rego"), meshPolicy)
	mesh := freeAddr(b)
	// Decisions go to the durable audit spool (write(2) per decision, fsync
	// every 10 ms), shipped to writd's collector: the production setting.
	orders, ordersAdmin := s.writProxy("orders", "--inbound", mesh, "--app", app, "--service", "orders", "--policy-dir", policyDir,
		"--audit-spool-dir", filepath.Join(s.dir, "orders-spool"))
	cfgFile := filepath.Join(s.dir, "proxy.yaml")
	write(b, cfgFile, fmt.Sprintf("clusters:\n- name: orders\n  lb_policy: ROUND_ROBIN\n  endpoints:\n  - address: %s\n  peer_ids: [spiffe://example.org/ns/shop/sa/orders]\n", mesh))
	up := freeAddr(b)
	front, frontAdmin := s.writProxy("frontend", "--proxy-config", cfgFile, "--upstream", "orders="+up)
	for _, a := range []string{ordersAdmin, frontAdmin} {
		waitHTTP(b, "http://"+a+"/readyz", nil)
	}
	s.admins = []string{frontAdmin, ordersAdmin}
	s.ctl = func() ctlSample { return sampleCtl(b, w) }
	return "http://" + up + "/", [][]int{{front.Process.Pid}, {orders.Process.Pid}}
}

// ctlSample is the control plane's cumulative CPU (clock ticks of writd,
// the postmaster with its exited children, and its live children) and the
// collector's counters at one moment.
type ctlSample struct {
	writd, pg       int64
	batches, events float64
}

// ctlCost is what a measured run cost the control plane.
type ctlCost struct {
	writdPer1k, pgPer1k float64 // CPU seconds per 1,000 requests
	batchesPerSec       float64 // collector batches committed per second
	eventsPerBatch      float64
}

func (c ctlSample) since(c0 ctlSample, n int64, d time.Duration) ctlCost {
	var r ctlCost
	if n > 0 {
		r.writdPer1k = float64(c.writd-c0.writd) / 100 / float64(n) * 1000
		r.pgPer1k = float64(c.pg-c0.pg) / 100 / float64(n) * 1000
	}
	if nb := c.batches - c0.batches; nb > 0 {
		r.batchesPerSec = nb / d.Seconds()
		r.eventsPerBatch = (c.events - c0.events) / nb
	}
	return r
}

func sampleCtl(b *testing.B, w *writd) ctlSample {
	var c ctlSample
	ticks := func(pid int, children bool) int64 {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return 0 // a backend that just exited: its time is in the postmaster's cutime
		}
		f := statFields(st)
		var n int64
		last := 12
		if children {
			last = 14 // cutime, cstime
		}
		for i := 11; i <= last; i++ {
			v, _ := strconv.ParseInt(f[i], 10, 64)
			n += v
		}
		return n
	}
	c.writd = ticks(w.cmd.Process.Pid, false)
	if pm := postmasterPID(b, w.dbURL); pm > 0 {
		c.pg = ticks(pm, true)
		for _, pid := range childrenOf(pm) {
			c.pg += ticks(pid, false)
		}
	}
	resp, err := http.Get("http://" + w.http + "/metrics")
	if err != nil {
		b.Fatalf("writd metrics: %v", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		name, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		v, _ := strconv.ParseFloat(val, 64)
		switch name {
		case `writ_audit_collector_batches_total{outcome="ok"}`:
			c.batches = v
		case "writ_audit_collector_events_total":
			c.events = v
		}
	}
	return c
}

// postmasterPID reads the PID from the socket lock file of the cluster
// that url's host (a socket directory) names; 0 if there is none.
func postmasterPID(b *testing.B, dbURL string) int {
	if u, err := neturl.Parse(dbURL); err == nil && u.Query().Get("host") != "" {
		locks, _ := filepath.Glob(filepath.Join(u.Query().Get("host"), ".s.PGSQL.*.lock"))
		for _, l := range locks {
			raw, err := os.ReadFile(l)
			if err != nil {
				continue
			}
			first, _, _ := strings.Cut(string(raw), "\n")
			if pid, err := strconv.Atoi(strings.TrimSpace(first)); err == nil {
				return pid
			}
		}
	}
	b.Logf("no postmaster found for %s: PostgreSQL's CPU is not counted", dbURL)
	return 0
}

// writProxy starts one writ-proxy (agent and proxy roles) with a join
// token for node NAME-node. The access log is off (the peers log nothing
// either); decisions go to the audit spool on the mesh side.
func (s *sysBench) writProxy(name string, args ...string) (*exec.Cmd, string) {
	b := s.b
	out, err := writTB(b, s.w, "token", "create", "--spiffe-id", "spiffe://example.org/node/"+name+"-node", "--ttl", "5m")
	if err != nil {
		b.Fatalf("token create: %v: %s", err, out)
	}
	var tok string
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Token: "); ok {
			tok = v
		}
	}
	bundle := filepath.Join(s.dir, name+"-bundle.json")
	write(b, bundle, s.w.get(b, "/bundle"))
	admin := freeAddr(b)
	sock := filepath.Join(s.dir, name+"-sock", "agent.sock")
	env := append([]string{"WRIT_JOIN_TOKEN=" + tok}, strings.Fields(os.Getenv("WRIT_BENCH_PROXY_ENV"))...)
	cmd := s.startEnv("writ-proxy-"+name, env, filepath.Join(binDir(b), "writ-proxy"), append([]string{
		"--control-plane", grpcAddrTB(b, s.w), "--trust-bundle", bundle, "--trust-domain", "example.org",
		"--workload-api", "unix://" + sock, "--admin-addr", admin, "--access-log", "",
	}, args...)...)
	return cmd, admin
}

func writTB(t testing.TB, w *writd, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(binDir(t), "writ"), append([]string{"--admin-socket", w.socket}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func grpcAddrTB(t testing.TB, w *writd) string {
	b, err := os.ReadFile(filepath.Join(w.dir, "writ.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "grpc: "); ok {
			return v
		}
	}
	t.Fatal("no grpc address in writd's config")
	return ""
}

// benchCerts are a throwaway CA and leaf certificates made with openssl
// for the nginx and HAProxy pairs: the server (orders) and the client
// (frontend, CN=frontend, URI SAN of its SPIFFE ID).
type benchCerts struct {
	ca, serverCrt, serverKey, serverPEM, clientCrt, clientKey, clientPEM string
	otherCrt, otherKey                                                   string // CN=other: the policy denies it
}

func (s *sysBench) peerCerts() *benchCerts {
	if s.certs != nil {
		return s.certs
	}
	d := filepath.Join(s.dir, "pki")
	if err := os.MkdirAll(d, 0o700); err != nil {
		s.b.Fatal(err)
	}
	run := func(args ...string) {
		cmd := exec.Command(s.tools["openssl"], args...)
		cmd.Dir = d
		if out, err := cmd.CombinedOutput(); err != nil {
			s.b.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ec := []string{"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"}
	run(append([]string{"req", "-x509", "-days", "1", "-subj", "/CN=bench CA", "-keyout", "ca.key", "-out", "ca.crt",
		"-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"}, ec...)...)
	leaf := func(name, cn, san, eku string) {
		run(append([]string{"req", "-new", "-subj", "/CN=" + cn, "-keyout", name + ".key", "-out", name + ".csr"}, ec...)...)
		write(s.b, filepath.Join(d, name+".ext"), fmt.Sprintf("subjectAltName=%s\nextendedKeyUsage=%s\n", san, eku))
		run("x509", "-req", "-in", name+".csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
			"-extfile", name+".ext", "-out", name+".crt")
		crt, _ := os.ReadFile(filepath.Join(d, name+".crt"))
		key, _ := os.ReadFile(filepath.Join(d, name+".key"))
		write(s.b, filepath.Join(d, name+".pem"), string(crt)+string(key))
	}
	leaf("server", "orders", "DNS:orders,URI:spiffe://example.org/ns/shop/sa/orders", "serverAuth")
	leaf("client", "frontend", "URI:spiffe://example.org/ns/shop/sa/frontend", "clientAuth")
	leaf("other", "other", "URI:spiffe://example.org/ns/shop/sa/other", "clientAuth")
	p := func(n string) string { return filepath.Join(d, n) }
	s.certs = &benchCerts{ca: p("ca.crt"), serverCrt: p("server.crt"), serverKey: p("server.key"), serverPEM: p("server.pem"),
		clientCrt: p("client.crt"), clientKey: p("client.key"), clientPEM: p("client.pem"),
		otherCrt: p("other.crt"), otherKey: p("other.key")}
	return s.certs
}

// benchOPAPolicy is meshPolicy's rule as OPA's default decision
// (system.main): undefined, hence 404 from `POST /`, unless allowed, so
// nginx's auth_request fails closed on a deny. nginx builds the input from
// the client certificate's CN (it cannot read URI SANs without njs).
const benchOPAPolicy = `package system

main if {
	input.writ.source.service_account == "frontend"
	input.writ.destination_service == "orders"
}
`

// nginxPair: A listens in plaintext for the client and proxies over mTLS
// (keep-alive upstream) to B, which requires a client certificate of the
// CA and proxies to the app; withOPA adds auth_request to a stock OPA.
func (s *sysBench) nginxPair(app string, withOPA bool) (string, [][]int) {
	b := s.b
	c := s.peerCerts()
	a, bAddr := freeAddr(b), freeAddr(b)
	user := ""
	if os.Geteuid() == 0 {
		user = "user root;"
	}
	common := func(n string) string {
		d := filepath.Join(s.dir, n)
		if err := os.MkdirAll(d, 0o755); err != nil {
			b.Fatal(err)
		}
		return fmt.Sprintf(`%s
worker_processes auto;
daemon off;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[2]s/body;
  proxy_temp_path %[2]s/proxy;
  fastcgi_temp_path %[2]s/fastcgi;
  uwsgi_temp_path %[2]s/uwsgi;
  scgi_temp_path %[2]s/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
`, user, d)
	}
	var sides [][]int
	authz, opaUp := "", ""
	if withOPA {
		pdir := filepath.Join(s.dir, "opa")
		if err := os.MkdirAll(pdir, 0o755); err != nil {
			b.Fatal(err)
		}
		write(b, filepath.Join(pdir, "policy.rego"), benchOPAPolicy)
		opaAddr := freeAddr(b)
		opa := s.start("opa", s.tools["opa"], "run", "--server", "--addr", opaAddr, "--log-level", "error", filepath.Join(pdir, "policy.rego"))
		waitHTTP(b, "http://"+opaAddr+"/health", nil)
		opaUp = fmt.Sprintf("  upstream opa { server %s; keepalive 64; keepalive_requests 1000000; }\n", opaAddr)
		authz = `      auth_request /_authz;
    }
    location = /_authz {
      internal;
      proxy_pass http://opa/;
      proxy_method POST;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Type application/json;
      proxy_set_body '{"writ":{"source":{"service_account":"$src_sa"},"destination_service":"orders"},"method":"$request_method","path":"$request_uri"}';
`
		sides = append(sides, []int{opa.Process.Pid})
	}
	confB := common("nginx-b") + opaUp + fmt.Sprintf(`  map $ssl_client_s_dn $src_sa { "CN=frontend" frontend; default ""; }
  upstream app { server %s; keepalive 64; keepalive_requests 1000000; }
  server {
    listen %s ssl;
    ssl_certificate %s;
    ssl_certificate_key %s;
    ssl_client_certificate %s;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
%s    }
  }
}
`, app, bAddr, c.serverCrt, c.serverKey, c.ca, authz)
	confA := common("nginx-a") + fmt.Sprintf(`  upstream b { server %s; keepalive 64; keepalive_requests 1000000; }
  server {
    listen %s;
    location / {
      proxy_pass https://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_certificate %s;
      proxy_ssl_certificate_key %s;
      proxy_ssl_trusted_certificate %s;
      proxy_ssl_verify on;
      proxy_ssl_name orders;
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_session_reuse on;
    }
  }
}
`, bAddr, a, c.clientCrt, c.clientKey, c.ca)
	var pids [][]int
	for _, n := range []struct{ name, conf, addr string }{{"nginx-b", confB, bAddr}, {"nginx-a", confA, a}} {
		f := filepath.Join(s.dir, n.name, "nginx.conf")
		write(b, f, n.conf)
		cmd := s.start(n.name, s.tools["nginx"], "-p", filepath.Join(s.dir, n.name), "-c", f, "-e", filepath.Join(s.dir, n.name, "error.log"))
		waitListen(b, n.addr, func() string { return s.logOf(n.name) })
		pids = append(pids, []int{cmd.Process.Pid})
	}
	// Workers are the masters' children; each side is master + workers
	// (+ OPA beside B).
	for i := range pids {
		var kids []int
		for range 100 {
			if kids = childrenOf(pids[i][0]); len(kids) >= runtime.NumCPU() {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		pids[i] = append(pids[i], kids...)
	}
	if withOPA {
		pids[0] = append(pids[0], sides[0]...)
		// The policy holds through nginx: frontend is let through,
		// another workload of the same CA is not.
		for _, k := range []struct {
			crt, key string
			allow    bool
		}{{c.clientCrt, c.clientKey, true}, {c.otherCrt, c.otherKey, false}} {
			if code := mtlsGet(b, bAddr, c.ca, k.crt, k.key); (code == http.StatusOK) != k.allow {
				b.Fatalf("nginx+opa: client %s got %d through B", k.crt, code)
			}
		}
	}
	return "http://" + a + "/", pids
}

// haproxyPair: the same shape in HAProxy: A plaintext → mTLS → B → app,
// HTTP mode with connection reuse.
func (s *sysBench) haproxyPair(app string) (string, [][]int) {
	b := s.b
	c := s.peerCerts()
	a, bAddr := freeAddr(b), freeAddr(b)
	defaults := `global
  maxconn 4000
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  http-reuse always
`
	confB := defaults + fmt.Sprintf(`frontend fe
  bind %s ssl crt %s ca-file %s verify required
  default_backend app
backend app
  server app %s
`, bAddr, c.serverPEM, c.ca, app)
	confA := defaults + fmt.Sprintf(`frontend fe
  bind %s
  default_backend peer
backend peer
  server b %s ssl crt %s ca-file %s verify required verifyhost orders sni str(orders)
`, a, bAddr, c.clientPEM, c.ca)
	var pids [][]int
	for _, n := range []struct{ name, conf, addr string }{{"haproxy-b", confB, bAddr}, {"haproxy-a", confA, a}} {
		f := filepath.Join(s.dir, n.name+".cfg")
		write(b, f, n.conf)
		cmd := s.start(n.name, s.tools["haproxy"], "-db", "-f", f)
		waitListen(b, n.addr, func() string { return s.logOf(n.name) })
		pids = append(pids, []int{cmd.Process.Pid})
	}
	return "http://" + a + "/", pids
}

// mtlsGet sends one GET over mTLS and returns the status.
func mtlsGet(b *testing.B, addr, ca, crt, key string) int {
	pair, err := tls.LoadX509KeyPair(crt, key)
	if err != nil {
		b.Fatal(err)
	}
	pem, err := os.ReadFile(ca)
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		Certificates: []tls.Certificate{pair}, RootCAs: pool, ServerName: "orders"}}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("https://" + addr + "/")
	if err != nil {
		b.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func childrenOf(ppid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		f := statFields(st)
		if len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			out = append(out, pid)
		}
	}
	return out
}

// statFields are /proc/PID/stat's fields after the command name: [0] is
// state, [1] ppid, [11] utime, [12] stime.
func statFields(st []byte) []string {
	i := bytes.LastIndexByte(st, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(st[i+1:]))
}

// cpuTicks sums utime+stime of pids (clock ticks, 100 per second on Linux).
func cpuTicks(b *testing.B, pids [][]int) int64 {
	var n int64
	for _, side := range pids {
		for _, pid := range side {
			st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil {
				b.Fatalf("process %d: %v", pid, err)
			}
			f := statFields(st)
			u, _ := strconv.ParseInt(f[11], 10, 64)
			s, _ := strconv.ParseInt(f[12], 10, 64)
			n += u + s
		}
	}
	return n
}

// resetPeakRSS starts each process's VmHWM afresh (clear_refs 5), so
// that a run's peak is its own and not the start-up's or an earlier
// run's.
func resetPeakRSS(b *testing.B, pids [][]int) {
	for _, side := range pids {
		for _, pid := range side {
			if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
				b.Fatalf("process %d: reset peak RSS: %v", pid, err)
			}
		}
	}
}

// peakRSS is the largest side's summed VmHWM, in bytes.
func peakRSS(b *testing.B, pids [][]int) int64 {
	var worst int64
	for _, side := range pids {
		var sum int64
		for _, pid := range side {
			f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
			if err != nil {
				b.Fatalf("process %d: %v", pid, err)
			}
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
					kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
					sum += kb << 10
				}
			}
			f.Close()
		}
		worst = max(worst, sum)
	}
	return worst
}

type fortioRun struct {
	qps              float64
	p50, p90, p99    float64 // seconds
	n, errs          int64
	cpuPer1k         float64 // proxy CPU seconds per 1,000 requests
	rssPeak          int64
	ctl              ctlCost // the writ pair's control plane; zero for the peers
	requestedQPS     int
	durationMeasured time.Duration
}

type sysResult struct {
	name       string
	fixed, sat fortioRun
}

func (s *sysBench) measure(name, url string, sides [][]int) *sysResult {
	b := s.b
	// Warm-up: connections, TLS sessions, pools, JIT-less caches. At the
	// fixed rate, so that the memory measured at that rate is not what a
	// saturating warm-up left behind (the saturation run comes last).
	stop := func() {}
	if s.profile != nil {
		stop = s.straceWarmup(sides)
	}
	w := s.fortio(name+"-warmup", url, s.qps, 2*time.Second)
	stop()
	if s.profile != nil {
		b.Logf("%s warm-up: %d requests (for the strace counts)", name, w.n)
	}
	r := &sysResult{name: name}
	for _, m := range []struct {
		run *fortioRun
		qps int
	}{{&r.fixed, s.qps}, {&r.sat, 0}} {
		var t0 int64
		var c0 ctlSample
		if sides != nil {
			t0 = cpuTicks(b, sides)
			resetPeakRSS(b, sides)
		}
		if s.ctl != nil {
			c0 = s.ctl()
		}
		wait := func() {}
		if s.profile != nil {
			wait = s.profile(m.qps, s.dur)
		}
		if dir := os.Getenv("WRIT_BENCH_TRACE"); dir != "" && sides != nil && s.admins != nil && m.qps == s.qps {
			tw := s.traceWrit(dir, s.dur)
			prev := wait
			wait = func() { prev(); tw() }
		}
		*m.run = s.fortio(fmt.Sprintf("%s-%d", name, m.qps), url, m.qps, s.dur)
		wait()
		if dir := os.Getenv("WRIT_BENCH_PPROF"); dir != "" && s.profile != nil {
			// Resident memory by kind (anonymous, file-backed) after the run.
			for i, side := range []string{"front", "back"} {
				if raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", sides[i][0])); err == nil {
					_ = os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-%d.smaps", side, m.qps)), raw, 0o644)
				}
				// Page faults so far (minflt and majflt are fields 10 and 12).
				if raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", sides[i][0])); err == nil {
					_ = os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-%d.stat", side, m.qps)), raw, 0o644)
				}
			}
		}
		if sides != nil {
			m.run.cpuPer1k = float64(cpuTicks(b, sides)-t0) / 100 / float64(m.run.n) * 1000
			m.run.rssPeak = peakRSS(b, sides)
		}
		if s.ctl != nil {
			m.run.ctl = s.ctl().since(c0, m.run.n, m.run.durationMeasured)
		}
		if m.run.errs > 0 {
			b.Errorf("%s at qps %d: %d of %d requests failed (logs in %s)", name, m.qps, m.run.errs, m.run.n, s.dir)
		}
	}
	return r
}

// profileWrit collects, over most of d, a CPU profile of each writ-proxy
// (front, back) from its admin port; allocation profiles follow when the
// run ends. Files go to dir as front-QPS.cpu, back.allocs, … (QPS 0 is
// the saturation run) for go tool pprof.
func (s *sysBench) profileWrit(dir string, sides [][]int, qps int, d time.Duration) func() {
	b := s.b
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	secs := max(1, int((d-time.Second)/time.Second))
	names := []string{"front", "back"}
	done := make(chan struct{}, 4)
	get := func(url, file string) {
		defer func() { done <- struct{}{} }()
		resp, err := http.Get(url)
		if err != nil {
			b.Logf("pprof %s: %v", url, err)
			return
		}
		defer resp.Body.Close()
		f, err := os.Create(file)
		if err != nil {
			b.Logf("pprof: %v", err)
			return
		}
		defer f.Close()
		_, _ = io.Copy(f, resp.Body)
	}
	for i, a := range s.admins {
		go get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", a, secs), filepath.Join(dir, fmt.Sprintf("%s-%d.cpu", names[i], qps)))
	}
	return func() {
		for range s.admins {
			<-done
		}
		for i, a := range s.admins {
			get(fmt.Sprintf("http://%s/debug/pprof/allocs", a), filepath.Join(dir, names[i]+".allocs"))
			<-done
		}
	}
}

// traceWrit collects an execution trace (runtime/trace) of each writ-proxy
// (front, back) over most of the fixed-rate run, as front.trace and
// back.trace in dir, for go tool trace: where a goroutine waited for a
// processor, and what held it.
func (s *sysBench) traceWrit(dir string, d time.Duration) func() {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		s.b.Fatal(err)
	}
	secs := max(1, int((d-time.Second)/time.Second))
	var wg sync.WaitGroup
	for i, name := range []string{"front", "back"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/trace?seconds=%d", s.admins[i], secs))
			if err != nil {
				s.b.Logf("trace %s: %v", name, err)
				return
			}
			defer resp.Body.Close()
			raw, _ := io.ReadAll(resp.Body)
			_ = os.WriteFile(filepath.Join(dir, name+".trace"), raw, 0o644)
		}()
	}
	return wg.Wait
}

// straceWarmup counts the system calls of each side's first process
// (strace -c -f) until the returned function is called; the warm-up's
// figures are not reported, so ptrace's slowdown costs nothing measured.
// Output goes next to the CPU profiles as front.strace and back.strace.
func (s *sysBench) straceWarmup(sides [][]int) func() {
	strace, err := exec.LookPath("strace")
	dir := os.Getenv("WRIT_BENCH_PPROF")
	if err != nil || dir == "" {
		return func() {}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		s.b.Fatal(err)
	}
	var cmds []*exec.Cmd
	for i, name := range []string{"front", "back"} {
		cmd := exec.Command(strace, "-c", "-f", "-o", filepath.Join(dir, name+".strace"), "-p", strconv.Itoa(sides[i][0]))
		if err := cmd.Start(); err == nil {
			cmds = append(cmds, cmd)
		}
	}
	time.Sleep(300 * time.Millisecond) // attached to every thread
	return func() {
		for _, c := range cmds {
			_ = c.Process.Signal(os.Interrupt)
			_ = c.Wait()
		}
	}
}

// fortio runs one bounded load and reads its JSON result.
func (s *sysBench) fortio(label, url string, qps int, d time.Duration) fortioRun {
	b := s.b
	out := filepath.Join(s.dir, label+".json")
	cmd := exec.Command(s.tools["fortio"], "load", "-qps", strconv.Itoa(qps), "-c", strconv.Itoa(s.conc), "-t", d.String(),
		"-payload-size", "1024", "-p", "50,90,99", "-json", out, "-loglevel", "Error", "-timeout", "5s", url)
	if o, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("fortio %s: %v\n%s", label, err, o)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		b.Fatal(err)
	}
	var res struct {
		ActualQPS         float64
		ActualDuration    int64
		RetCodes          map[string]int64
		DurationHistogram struct {
			Count       int64
			Percentiles []struct{ Percentile, Value float64 }
		}
	}
	if err := json.Unmarshal(raw, &res); err != nil {
		b.Fatalf("fortio %s: %v", label, err)
	}
	r := fortioRun{qps: res.ActualQPS, n: res.DurationHistogram.Count, requestedQPS: qps, durationMeasured: time.Duration(res.ActualDuration)}
	r.errs = r.n - res.RetCodes["200"]
	for _, p := range res.DurationHistogram.Percentiles {
		switch p.Percentile {
		case 50:
			r.p50 = p.Value
		case 90:
			r.p90 = p.Value
		case 99:
			r.p99 = p.Value
		}
	}
	return r
}

func printSystem(w io.Writer, rs []*sysResult, qps, conc int, dur time.Duration) {
	if len(rs) == 0 || rs[0].name != "direct" {
		return
	}
	d := rs[0]
	ms := func(v float64) string { return fmt.Sprintf("%.3f", v*1000) }
	fmt.Fprintf(w, "\nmake bench: fortio, %d connections, 1 KiB POST echoed, HTTP/1.1 keep-alive, %s per run\n", conc, dur)
	fmt.Fprintf(w, "direct at %d rps: p50 %s ms, p90 %s ms, p99 %s ms; direct saturation %.0f rps\n\n", qps, ms(d.fixed.p50), ms(d.fixed.p90), ms(d.fixed.p99), d.sat.qps)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "pair\tadded p50 ms\tadded p90 ms\tadded p99 ms\tmax rps\tCPU s/1k req @%d\tCPU s/1k req @max\tpeak RSS/proxy MiB @%d\tpeak RSS MiB @max\t\n", qps, qps)
	for _, r := range rs[1:] {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.0f\t%.3f\t%.3f\t%.1f\t%.1f\t\n", r.name,
			ms(r.fixed.p50-d.fixed.p50), ms(r.fixed.p90-d.fixed.p90), ms(r.fixed.p99-d.fixed.p99), r.sat.qps,
			r.fixed.cpuPer1k, r.sat.cpuPer1k, float64(r.fixed.rssPeak)/(1<<20), float64(r.sat.rssPeak)/(1<<20))
	}
	tw.Flush()
	var writ *sysResult
	for _, r := range rs {
		if r.name == "writ" {
			writ = r
		}
	}
	if writ == nil {
		return
	}
	fmt.Fprintf(w, "\nwrit pair's audit trail in the control plane (same cores; the peers record nothing)\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "run\twritd CPU s/1k req\tpostgres CPU s/1k req\tcollector batches/s\tevents/batch\t\n")
	for _, m := range []struct {
		name string
		run  fortioRun
	}{{fmt.Sprintf("@%d", qps), writ.fixed}, {"@max", writ.sat}} {
		c := m.run.ctl
		fmt.Fprintf(tw, "%s\t%.3f\t%.3f\t%.1f\t%.0f\t\n", m.name, c.writdPer1k, c.pgPer1k, c.batchesPerSec, c.eventsPerBatch)
	}
	tw.Flush()
	fmt.Fprintf(w, "\nwrit / peer (latency, CPU and RSS: lower is better; throughput: higher is better)\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "peer\tadded p50\tadded p90\tadded p99\tmax rps\tCPU/req @%d\tCPU/req @max\tRSS @%d\tRSS @max\t\n", qps, qps)
	ratio := func(a, b float64) string {
		if b <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f", a/b)
	}
	for _, r := range rs[1:] {
		if r == writ {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.name,
			ratio(writ.fixed.p50-d.fixed.p50, r.fixed.p50-d.fixed.p50),
			ratio(writ.fixed.p90-d.fixed.p90, r.fixed.p90-d.fixed.p90),
			ratio(writ.fixed.p99-d.fixed.p99, r.fixed.p99-d.fixed.p99),
			ratio(writ.sat.qps, r.sat.qps),
			ratio(writ.fixed.cpuPer1k, r.fixed.cpuPer1k), ratio(writ.sat.cpuPer1k, r.sat.cpuPer1k),
			ratio(float64(writ.fixed.rssPeak), float64(r.fixed.rssPeak)), ratio(float64(writ.sat.rssPeak), float64(r.sat.rssPeak)))
	}
	tw.Flush()
}

// waitHTTP waits up to 60 s for url to answer 200.
func waitHTTP(t testing.TB, url string, logs func() string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	c := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := c.Get(url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		if time.Now().After(deadline) {
			msg := ""
			if logs != nil {
				msg = logs()
			}
			t.Fatalf("%s not ready: %v\n%s", url, err, msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitListen waits up to 30 s for a TCP listener on addr.
func waitListen(t testing.TB, addr string, logs func() string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s: %v\n%s", addr, err, logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
