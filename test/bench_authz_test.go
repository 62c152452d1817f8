package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jonboulle/clockwork"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/genproto/googleapis/rpc/code"

	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/enforcertest"
	"github.com/writmesh/writ/internal/syncbuf"
	"github.com/writmesh/writ/policy"
)

// The side-by-side authorization benchmark behind `make bench-authz`: the
// same ~50-rule opa-envoy-style policy (glob.match on paths) and the same
// requests, whose paths carry fresh high-cardinality ids, answered by
//
//   - Writ's in-process enforcer.Check, one goroutine (per-core figure),
//   - OPA's in-process evaluation as opa-envoy-plugin does it (protojson
//     input, prepared rego query), one goroutine,
//   - writ-enforcer over gRPC with mTLS (SVIDs from a real agent),
//   - a stock OPA server over its data API (POST /v1/data/envoy/authz/allow),
//
// both servers pulling the policy as a bundle from writd's bundle service.
// Every system's answers are checked against Writ's uncached in-process
// answers. Knobs (environment): WRIT_OPA_BIN (required: a stock opa
// binary), WRIT_BENCH_CONC (concurrent requests against the servers,
// default 16), WRIT_BENCH_N (requests per server, default 10000),
// WRIT_BENCH_MAX (time cap per server phase, default 20s),
// WRIT_BENCH_PROFILE (file for a CPU profile of writ-enforcer over
// WRIT_BENCH_PROFILE_SECONDS of the server rounds), WRIT_BENCH_ENFORCER_B
// (a second writ-enforcer binary run in the same rounds, for A/B, with
// the environment variables in WRIT_BENCH_ENFORCER_B_ENV).
func BenchmarkAuthzSideBySide(b *testing.B) {
	opaBin := os.Getenv("WRIT_OPA_BIN")
	if opaBin == "" {
		b.Fatal("set WRIT_OPA_BIN to a stock opa binary (make bench-authz builds one)")
	}
	conc := envInt(b, "WRIT_BENCH_CONC", 16)
	nServer := envInt(b, "WRIT_BENCH_N", 10000)
	maxDur := 20 * time.Second
	if s := os.Getenv("WRIT_BENCH_MAX"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			b.Fatal(err)
		}
		maxDur = d
	}
	ctx := context.Background()
	dir := b.TempDir()
	write(b, filepath.Join(dir, "rbac.rego"), authzBenchPolicy())
	write(b, filepath.Join(dir, ".manifest"), `{"revision": "bench-1"}`)

	const nInProc = 50000
	reqs := authzBenchRequests(max(nInProc, nServer))

	// Reference answers: Writ in process, cache off.
	ref := make([]bool, len(reqs))
	{
		e := benchEnforcer(b, dir, -1)
		allowed := 0
		for i, r := range reqs {
			_, d := e.Check(ctx, r)
			ref[i] = d.Result == enforcer.ResultAllow
			if ref[i] {
				allowed++
			}
		}
		if allowed == 0 || allowed == len(reqs) {
			b.Fatalf("%d of %d allowed: the requests do not exercise the policy", allowed, len(reqs))
		}
	}
	var inproc []*benchSystem
	for _, cache := range []int{0, -1} {
		e := benchEnforcer(b, dir, cache)
		name := "writ in-process Check (cache on)"
		if cache < 0 {
			name = "writ in-process Check (cache off)"
		}
		inproc = append(inproc, &benchSystem{name: name, conc: 1, n: nInProc, cpu: selfCPU, f: func(_ context.Context, i int) (bool, error) {
			_, d := e.Check(ctx, reqs[i])
			return d.Result == enforcer.ResultAllow, nil
		}})
	}
	{
		pq, err := rego.New(rego.Query("data.envoy.authz.allow"), rego.Module("rbac.rego", authzBenchPolicy())).PrepareForEval(ctx)
		if err != nil {
			b.Fatal(err)
		}
		inproc = append(inproc, &benchSystem{name: "opa in-process (opa-envoy input, rego)", conc: 1, n: min(nInProc, 5000), cpu: selfCPU, f: func(ctx context.Context, i int) (bool, error) {
			in, err := enforcertest.OPAEnvoyInput(reqs[i])
			if err != nil {
				return false, err
			}
			rs, err := pq.Eval(ctx, rego.EvalInput(in))
			if err != nil {
				return false, err
			}
			return len(rs) == 1 && rs[0].Expressions[0].Value == true, nil
		}})
	}
	runInterleaved(b, inproc, maxDur, ref)

	// Servers: both pull the policy from writd's bundle service and run
	// side by side, measured in alternating rounds.
	// writ-enforcer records every decision in its audit spool before
	// answering (write(2) per decision, fsync grouped: the default
	// durability) and ships the spool to writd's collector, which inserts
	// it into PostgreSQL; writd's CPU is reported apart. SVIDs come from
	// a node agent of that writd, so the collector accepts the stream.
	w := startWritd(b, writdOptions{extra: fmt.Sprintf("policy:\n  dir: %s\n  bundle_name: mesh\n  plain_http: true\n", dir)})
	bundleURL := "http://" + w.http + "/bundles/mesh"
	wl := startWritdAgent(b, w, "bench", enforcerID, clientID)
	src := x509Source(b, wl, clientID)
	p := startEnforcer(b, "--workload-api", wl, "--spiffe-id", enforcerID.String(), "--bundle-url", bundleURL,
		"--audit-spool-dir", b.TempDir(), "--audit-collector", w.grpc, "--log-level", "warn", "--pprof")
	cc := dialEnforcer(b, src, p.listen)
	client := authv3.NewAuthorizationClient(cc)
	opaURL, opaPID := startOPA(b, opaBin, w.http)
	bodies := make([][]byte, nServer)
	for i := range bodies {
		in, err := enforcertest.OPAEnvoyInput(reqs[i])
		if err != nil {
			b.Fatal(err)
		}
		if bodies[i], err = json.Marshal(map[string]any{"input": in}); err != nil {
			b.Fatal(err)
		}
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conc, MaxConnsPerHost: conc}}
	writdCPU := procCPU(b, w.cmd.Process.Pid)
	servers := []*benchSystem{
		{name: "writ-enforcer (gRPC ext_authz, mTLS)", conc: conc, n: nServer, cpu: procCPU(b, p.cmd.Process.Pid), clientCPU: selfCPU, writdCPU: writdCPU, f: func(ctx context.Context, i int) (bool, error) {
			resp, err := client.Check(ctx, reqs[i])
			if err != nil {
				return false, err
			}
			return resp.GetStatus().GetCode() == int32(code.Code_OK), nil
		}},
		{name: "opa server (POST /v1/data, HTTP/1.1)", conc: conc, n: nServer, cpu: procCPU(b, opaPID), clientCPU: selfCPU, writdCPU: writdCPU, f: func(ctx context.Context, i int) (bool, error) {
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, opaURL+"/v1/data/envoy/authz/allow", bytes.NewReader(bodies[i]))
			if err != nil {
				return false, err
			}
			req.Header.Set("Content-Type", "application/json")
			resp, err := hc.Do(req)
			if err != nil {
				return false, err
			}
			defer resp.Body.Close()
			var out struct {
				Result *bool `json:"result"`
			}
			if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&out); err != nil {
				return false, fmt.Errorf("opa answer: %s: %w", resp.Status, err)
			}
			if out.Result == nil {
				return false, fmt.Errorf("opa answer undefined (%s): is the bundle loaded?", resp.Status)
			}
			return *out.Result, nil
		}},
	}
	profDone := make(chan struct{})
	if prof := os.Getenv("WRIT_BENCH_PROFILE"); prof != "" {
		// A CPU profile of writ-enforcer over the server rounds; the
		// enforcer is stopped only after it is written.
		go func() {
			defer close(profDone)
			resp, err := http.Get("http://" + p.admin + "/debug/pprof/profile?seconds=" + os.Getenv("WRIT_BENCH_PROFILE_SECONDS"))
			if err != nil {
				return
			}
			defer resp.Body.Close()
			f, err := os.Create(prof)
			if err != nil {
				return
			}
			defer f.Close()
			_, _ = io.Copy(f, resp.Body)
		}()
	} else {
		close(profDone)
	}
	var pB *enforcerProc
	if binB := os.Getenv("WRIT_BENCH_ENFORCER_B"); binB != "" {
		// A/B: a second writ-enforcer (another build, or the same with
		// WRIT_BENCH_ENFORCER_B_ENV), measured in the same rounds.
		pB = startEnforcerBin(b, binB, strings.Fields(os.Getenv("WRIT_BENCH_ENFORCER_B_ENV")), "--workload-api", wl,
			"--spiffe-id", enforcerID.String(), "--bundle-url", bundleURL,
			"--audit-spool-dir", b.TempDir(), "--audit-collector", w.grpc, "--log-level", "warn")
		clientB := authv3.NewAuthorizationClient(dialEnforcer(b, src, pB.listen))
		servers = append(servers, &benchSystem{name: "writ-enforcer B " + filepath.Base(binB), conc: conc, n: nServer,
			cpu: procCPU(b, pB.cmd.Process.Pid), clientCPU: selfCPU, writdCPU: writdCPU, f: func(ctx context.Context, i int) (bool, error) {
				resp, err := clientB.Check(ctx, reqs[i])
				if err != nil {
					return false, err
				}
				return resp.GetStatus().GetCode() == int32(code.Code_OK), nil
			}})
	}
	runInterleaved(b, servers, maxDur, ref)
	<-profDone
	if pB != nil {
		if code := pB.stop(b); code != 0 {
			b.Fatalf("writ-enforcer B exit %d\n%s", code, pB.log)
		}
	}
	if code := p.stop(b); code != 0 {
		b.Fatalf("writ-enforcer exit %d\n%s", code, p.log)
	}

	rows := append(inproc, servers...)
	printAuthzTable(rows, conc)
	b.ReportMetric(rows[0].rate/rows[2].rate, "inproc-x")
	b.ReportMetric(rows[3].rate/rows[4].rate, "server-x")
}

// benchRounds is how many alternating rounds share each system's
// requests, so that load from elsewhere on the machine falls on all of
// them alike.
const benchRounds = 5

// benchSystem is one thing answering requests, and what it measured.
type benchSystem struct {
	name    string
	conc, n int
	f       func(ctx context.Context, i int) (bool, error)
	// cpu reads the cumulative CPU time of the process doing the work;
	// for servers, clientCPU reads the load client's (this process) and
	// writdCPU writd's (the bundle server and audit collector).
	cpu, clientCPU, writdCPU func() time.Duration

	clientUsed, writdUsed time.Duration

	lat       []time.Duration
	cpuUsed   time.Duration
	elapsed   time.Duration
	rate      float64
	p50, p99  time.Duration
	mismatch  int
	errs      int
	firstErrs []string
}

// runInterleaved warms every system up, then gives each its share of
// requests round by round, each system's rounds bounded by maxDur in all.
func runInterleaved(b *testing.B, systems []*benchSystem, maxDur time.Duration, ref []bool) {
	ctx, cancel := context.WithTimeout(context.Background(), maxDur*time.Duration(len(systems))+time.Minute)
	defer cancel()
	for _, s := range systems {
		for i := range min(s.n, 300) {
			if _, err := s.f(ctx, i); err != nil {
				b.Fatalf("%s: warm-up: %v", s.name, err)
			}
		}
	}
	for r := range benchRounds {
		for _, s := range systems {
			if s.elapsed >= maxDur {
				continue
			}
			s.round(ctx, r*s.n/benchRounds, (r+1)*s.n/benchRounds, maxDur-s.elapsed, ref)
		}
	}
	for _, s := range systems {
		s.finish(b)
	}
}

// round answers requests [from, to) from conc goroutines, stopping early
// after budget.
func (s *benchSystem) round(ctx context.Context, from, to int, budget time.Duration, ref []bool) {
	lat := make([]time.Duration, to-from)
	done := make([]bool, to-from)
	var next atomic.Int64
	next.Store(int64(from))
	var mismatch, errs atomic.Int64
	var mu sync.Mutex
	cpu0 := s.cpu()
	var client0, writd0 time.Duration
	if s.clientCPU != nil {
		client0, writd0 = s.clientCPU(), s.writdCPU()
	}
	start := time.Now()
	deadline := start.Add(budget)
	var wg sync.WaitGroup
	for range s.conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= to || time.Now().After(deadline) {
					return
				}
				t0 := time.Now()
				got, err := s.f(ctx, i)
				lat[i-from] = time.Since(t0)
				done[i-from] = true
				if err != nil {
					errs.Add(1)
					mu.Lock()
					if len(s.firstErrs) < 3 {
						s.firstErrs = append(s.firstErrs, err.Error())
					}
					mu.Unlock()
					continue
				}
				if got != ref[i] {
					mismatch.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	s.elapsed += time.Since(start)
	s.cpuUsed += s.cpu() - cpu0
	if s.clientCPU != nil {
		s.clientUsed += s.clientCPU() - client0
		s.writdUsed += s.writdCPU() - writd0
	}
	for i, ok := range done {
		if ok {
			s.lat = append(s.lat, lat[i])
		}
	}
	s.mismatch += int(mismatch.Load())
	s.errs += int(errs.Load())
}

func (s *benchSystem) finish(b *testing.B) {
	if len(s.lat) == 0 {
		b.Fatalf("%s: no requests completed", s.name)
	}
	slices.Sort(s.lat)
	s.rate = float64(len(s.lat)) / s.elapsed.Seconds()
	s.p50, s.p99 = s.lat[len(s.lat)/2], s.lat[len(s.lat)*99/100]
	if s.mismatch > 0 || s.errs > 0 {
		b.Errorf("%s: %d answers disagree with Writ's reference, %d errors %s", s.name, s.mismatch, s.errs, strings.Join(s.firstErrs, "; "))
	}
}

func envInt(b *testing.B, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

func benchEnforcer(b *testing.B, dir string, cacheSize int) *enforcer.Enforcer {
	eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir, CacheSize: cacheSize})
	if err != nil {
		b.Fatal(err)
	}
	e, err := enforcer.New(enforcer.Options{Engine: eng, Clock: clockwork.NewRealClock(),
		Sink: enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil })})
	if err != nil {
		b.Fatal(err)
	}
	return e
}

func printAuthzTable(rows []*benchSystem, conc int) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "system\tconcurrency\tdecisions\telapsed\tdecisions/s\tdecisions/cpu-s\tp50\tp99\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.2fs\t%.0f\t%.0f\t%s\t%s\t\n", r.name, r.conc, len(r.lat), r.elapsed.Seconds(), r.rate, r.perCPU(),
			r.p50.Round(100*time.Nanosecond), r.p99.Round(100*time.Nanosecond))
	}
	tw.Flush()
	ratio := func(a, b float64) string { return fmt.Sprintf("%.1fx", a/b) }
	fmt.Printf("\nin-process, decisions per CPU-second (per core): writ (cache on) / opa = %s, writ (cache off) / opa = %s (goal >= 20x)\n",
		ratio(rows[0].perCPU(), rows[2].perCPU()), ratio(rows[1].perCPU(), rows[2].perCPU()))
	fmt.Printf("  by wall clock: %s and %s; p99 %s vs %s\n", ratio(rows[0].rate, rows[2].rate), ratio(rows[1].rate, rows[2].rate),
		rows[0].p99.Round(100*time.Nanosecond), rows[2].p99.Round(100*time.Nanosecond))
	fmt.Printf("servers at %d concurrent requests: writ-enforcer / opa server = %s by throughput (goal >= 10x), %s per server CPU-second; p99 %s vs %s (goal: lower)\n",
		conc, ratio(rows[3].rate, rows[4].rate), ratio(rows[3].perCPU(), rows[4].perCPU()), rows[3].p99.Round(time.Microsecond), rows[4].p99.Round(time.Microsecond))
	fmt.Println("decisions/cpu-s: in-process, CPU time of this process (the only work in it then, GC included); servers, CPU time of the server process alone")
	for _, r := range rows[3:] {
		perDecision := func(d time.Duration) string {
			return fmt.Sprintf("%.1fµs", float64(d.Microseconds())/float64(len(r.lat)))
		}
		fmt.Printf("  %s: CPU per decision: server %s, load client %s, writd %s\n", r.name, perDecision(r.cpuUsed), perDecision(r.clientUsed), perDecision(r.writdUsed))
	}
	fmt.Printf("(one machine: load client, servers and other work share its cores; systems ran in %d alternating rounds; every answer was checked against Writ's uncached one)\n", benchRounds)
}

// x509Source is a Workload API client of addr holding id's SVID.
func x509Source(tb testing.TB, addr string, id spiffeid.ID) *workloadapi.X509Source {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)), pick(id))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { src.Close() })
	return src
}

// startOPA runs a stock OPA server whose only policy is the bundle it
// pulls from writd, and waits until the bundle is active.
func startOPA(b *testing.B, bin, writdAddr string) (string, int) {
	dir := b.TempDir()
	addr := freeAddr(b)
	cfg := fmt.Sprintf(`services:
  writd:
    url: http://%s
bundles:
  mesh:
    service: writd
    resource: /bundles/mesh
    polling:
      min_delay_seconds: 10
      max_delay_seconds: 20
`, writdAddr)
	write(b, filepath.Join(dir, "opa.yaml"), cfg)
	log := &syncbuf.Buffer{}
	cmd := exec.Command(bin, "run", "--server", "--addr", addr, "--config-file", filepath.Join(dir, "opa.yaml"),
		"--log-level", "error", "--skip-version-check")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	b.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	base := "http://" + addr
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(base + "/health?bundles=true")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return base, cmd.Process.Pid
			}
		}
		select {
		case err := <-done:
			b.Fatalf("opa exited: %v\n%s", err, log)
		default:
		}
		if time.Now().After(deadline) {
			b.Fatalf("opa never activated the bundle from writd\n%s", log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The policy and requests, as in enforcer's BenchmarkCheck: one rule per
// (caller, method, path glob), paths with fresh 64-bit ids.
const authzBenchRules = 50

func authzBenchPrincipal(i int) string {
	return fmt.Sprintf("spiffe://cluster.local/ns/team%d/sa/svc%d", i%10, i)
}

func authzBenchMethod(i int) string { return []string{"GET", "POST", "PUT", "DELETE"}[i%4] }

func authzBenchPolicy() string {
	var s strings.Builder
	s.WriteString("package envoy.authz\n\ndefault allow := false\n")
	for i := range authzBenchRules {
		fmt.Fprintf(&s, `
allow if {
	input.attributes.source.principal == %q
	input.attributes.request.http.method == %q
	glob.match("/api/v1/svc%d/*/items/*", ["/"], input.attributes.request.http.path)
}
`, authzBenchPrincipal(i), authzBenchMethod(i), i)
	}
	return s.String()
}

func authzBenchRequests(n int) []*authv3.CheckRequest {
	r := rand.New(rand.NewPCG(11, 11))
	peer := func(id string, port uint32) *authv3.AttributeContext_Peer {
		return &authv3.AttributeContext_Peer{Principal: id, Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}}
	}
	reqs := make([]*authv3.CheckRequest, n)
	for i := range reqs {
		rule := r.IntN(authzBenchRules)
		method := authzBenchMethod(rule)
		svc := rule
		if r.IntN(3) == 0 {
			svc = (rule + 1) % authzBenchRules // another service's path: denied
		}
		path := fmt.Sprintf("/api/v1/svc%d/%016x/items/%016x?page=%d", svc, r.Uint64(), r.Uint64(), r.IntN(10))
		reqs[i] = &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Source:      peer(authzBenchPrincipal(rule), uint32(40000+r.IntN(20000))),
			Destination: peer("spiffe://cluster.local/ns/shop/sa/orders", 8080),
			Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
				Id: fmt.Sprint(i), Method: method, Path: path, Host: "svc.mesh", Scheme: "https", Protocol: "HTTP/2",
				Headers: map[string]string{
					":authority": "svc.mesh", ":method": method, ":path": path, ":scheme": "https",
					"user-agent": "bench/1.0", "x-request-id": fmt.Sprintf("%016x", r.Uint64()),
					"traceparent": fmt.Sprintf("00-%016x%016x-%016x-01", r.Uint64(), r.Uint64(), r.Uint64()),
				},
			}},
		}}
	}
	return reqs
}

// perCPU is decisions per CPU-second of the deciding process: on a shared
// machine, a fairer per-core figure than wall-clock throughput.
func (s *benchSystem) perCPU() float64 {
	if s.cpuUsed <= 0 {
		return 0
	}
	return float64(len(s.lat)) / s.cpuUsed.Seconds()
}

// selfCPU is this process's CPU time, user and system.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU reads another process's CPU time from /proc (clock ticks of
// 10 ms: fine over rounds of seconds).
func procCPU(b *testing.B, pid int) func() time.Duration {
	return func() time.Duration {
		bs, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			b.Fatalf("cpu time of %d: %v", pid, err)
		}
		// Fields after the command name in parentheses; utime and stime
		// are the 14th and 15th fields of the whole line.
		f := strings.Fields(string(bs[strings.LastIndexByte(string(bs), ')')+2:]))
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		return time.Duration(ut+st) * 10 * time.Millisecond
	}
}
