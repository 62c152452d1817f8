package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"text/tabwriter"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jonboulle/clockwork"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/util"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/writmesh/writ/enforcer"
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
// WRIT_BENCH_MAX (time cap per server phase, default 20s).
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
	var rows []benchRow

	for _, cache := range []int{0, -1} {
		e := benchEnforcer(b, dir, cache)
		name := "writ in-process Check (cache on)"
		if cache < 0 {
			name = "writ in-process Check (cache off)"
		}
		rows = append(rows, runSerial(b, name, nInProc, func(i int) bool {
			_, d := e.Check(ctx, reqs[i])
			return d.Result == enforcer.ResultAllow
		}, ref))
	}
	{
		pq, err := rego.New(rego.Query("data.envoy.authz.allow"), rego.Module("rbac.rego", authzBenchPolicy())).PrepareForEval(ctx)
		if err != nil {
			b.Fatal(err)
		}
		rows = append(rows, runSerial(b, "opa in-process (opa-envoy input, rego)", min(nInProc, 5000), func(i int) bool {
			in, err := opaEnvoyInput(reqs[i])
			if err != nil {
				b.Fatal(err)
			}
			rs, err := pq.Eval(ctx, rego.EvalInput(in))
			if err != nil {
				b.Fatal(err)
			}
			return len(rs) == 1 && rs[0].Expressions[0].Value == true
		}, ref))
	}

	// Servers: both pull the policy from writd's bundle service.
	w := startWritd(b, fmt.Sprintf("policy:\n  dir: %s\n  bundle_name: mesh\n", dir))
	bundleURL := "http://" + w.http + "/bundles/mesh"
	wl, src := enforcerEnv(b)
	p := startEnforcer(b, "--workload-api", wl, "--spiffe-id", enforcerID.String(), "--bundle-url", bundleURL,
		"--log-level", "warn")
	cc := dialEnforcer(b, src, p.listen)
	client := authv3.NewAuthorizationClient(cc)
	rows = append(rows, runConcurrent(b, "writ-enforcer (gRPC ext_authz, mTLS)", conc, nServer, maxDur, func(ctx context.Context, i int) (bool, error) {
		resp, err := client.Check(ctx, reqs[i])
		if err != nil {
			return false, err
		}
		return resp.GetStatus().GetCode() == int32(code.Code_OK), nil
	}, ref))
	if code := p.stop(b); code != 0 {
		b.Fatalf("writ-enforcer exit %d", code)
	}

	opaURL := startOPA(b, opaBin, w.http)
	bodies := make([][]byte, nServer)
	for i := range bodies {
		in, err := opaEnvoyInput(reqs[i])
		if err != nil {
			b.Fatal(err)
		}
		if bodies[i], err = json.Marshal(map[string]any{"input": in}); err != nil {
			b.Fatal(err)
		}
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conc, MaxConnsPerHost: conc}}
	rows = append(rows, runConcurrent(b, "opa server (POST /v1/data, HTTP/1.1)", conc, nServer, maxDur, func(ctx context.Context, i int) (bool, error) {
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
	}, ref))

	printAuthzTable(rows, conc)
	b.ReportMetric(rows[0].rate/rows[2].rate, "inproc-x")
	b.ReportMetric(rows[3].rate/rows[4].rate, "server-x")
}

type benchRow struct {
	name      string
	conc, n   int
	elapsed   time.Duration
	rate      float64
	p50, p99  time.Duration
	mismatch  int
	errs      int
	firstErrs string
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

// runSerial answers n requests on one goroutine, after a warm-up.
func runSerial(b *testing.B, name string, n int, f func(i int) bool, ref []bool) benchRow {
	for i := range min(n, 500) {
		f(i)
	}
	lat := make([]time.Duration, n)
	row := benchRow{name: name, conc: 1, n: n}
	start := time.Now()
	for i := range n {
		t0 := time.Now()
		got := f(i)
		lat[i] = time.Since(t0)
		if got != ref[i] {
			row.mismatch++
		}
	}
	row.elapsed = time.Since(start)
	row.finish(b, lat)
	return row
}

// runConcurrent sends up to n requests from conc goroutines, stopping at
// maxDur, after a warm-up.
func runConcurrent(b *testing.B, name string, conc, n int, maxDur time.Duration, f func(ctx context.Context, i int) (bool, error), ref []bool) benchRow {
	ctx, cancel := context.WithTimeout(context.Background(), maxDur+30*time.Second)
	defer cancel()
	for i := range min(n, 200) {
		if _, err := f(ctx, i); err != nil {
			b.Fatalf("%s: warm-up: %v", name, err)
		}
	}
	lat := make([]time.Duration, n)
	done := make([]bool, n)
	var next atomic.Int64
	var mismatch, errs atomic.Int64
	var mu sync.Mutex
	var firstErrs []string
	deadline := time.Now().Add(maxDur)
	var wg sync.WaitGroup
	start := time.Now()
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || time.Now().After(deadline) {
					return
				}
				t0 := time.Now()
				got, err := f(ctx, i)
				lat[i] = time.Since(t0)
				done[i] = true
				if err != nil {
					errs.Add(1)
					mu.Lock()
					if len(firstErrs) < 3 {
						firstErrs = append(firstErrs, err.Error())
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
	elapsed := time.Since(start)
	var got []time.Duration
	for i, ok := range done {
		if ok {
			got = append(got, lat[i])
		}
	}
	row := benchRow{name: name, conc: conc, n: len(got), elapsed: elapsed, mismatch: int(mismatch.Load()), errs: int(errs.Load()),
		firstErrs: strings.Join(firstErrs, "; ")}
	row.finish(b, got)
	return row
}

func (r *benchRow) finish(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		b.Fatalf("%s: no requests completed", r.name)
	}
	slices.Sort(lat)
	r.rate = float64(len(lat)) / r.elapsed.Seconds()
	r.p50, r.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	if r.mismatch > 0 || r.errs > 0 {
		b.Errorf("%s: %d answers disagree with Writ's reference, %d errors %s", r.name, r.mismatch, r.errs, r.firstErrs)
	}
}

func printAuthzTable(rows []benchRow, conc int) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "system\tconcurrency\tdecisions\telapsed\tdecisions/s\tp50\tp99\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.2fs\t%.0f\t%s\t%s\t\n", r.name, r.conc, r.n, r.elapsed.Seconds(), r.rate,
			r.p50.Round(100*time.Nanosecond), r.p99.Round(100*time.Nanosecond))
	}
	tw.Flush()
	ratio := func(a, b float64) string { return fmt.Sprintf("%.1fx", a/b) }
	fmt.Printf("\nin-process per core: writ (cache on) / opa = %s, writ (cache off) / opa = %s (goal >= 20x); p99 %s vs %s\n",
		ratio(rows[0].rate, rows[2].rate), ratio(rows[1].rate, rows[2].rate), rows[0].p99.Round(100*time.Nanosecond), rows[2].p99.Round(100*time.Nanosecond))
	fmt.Printf("servers at %d concurrent requests: writ-enforcer / opa server = %s (goal >= 10x); p99 %s vs %s (goal: lower)\n",
		conc, ratio(rows[3].rate, rows[4].rate), rows[3].p99.Round(time.Microsecond), rows[4].p99.Round(time.Microsecond))
	fmt.Println("(one machine: load client, servers and other work share its cores; answers of every system were checked against Writ's uncached ones)")
}

// startOPA runs a stock OPA server whose only policy is the bundle it
// pulls from writd, and waits until the bundle is active.
func startOPA(b *testing.B, bin, writdAddr string) string {
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
	log := &syncBuffer{}
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
				return base
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

// opaEnvoyInput builds the input as opa-envoy-plugin does: protojson of
// the CheckRequest plus parsed_path, parsed_query and version.
func opaEnvoyInput(req *authv3.CheckRequest) (map[string]any, error) {
	bs, err := protojson.Marshal(req)
	if err != nil {
		return nil, err
	}
	var in map[string]any
	if err := util.UnmarshalJSON(bs, &in); err != nil {
		return nil, err
	}
	in["version"] = map[string]any{"ext_authz": "v3", "encoding": "protojson"}
	u, err := url.Parse(req.GetAttributes().GetRequest().GetHttp().GetPath())
	if err != nil {
		return nil, err
	}
	var pp []any
	for _, s := range strings.Split(strings.TrimLeft(u.Path, "/"), "/") {
		pp = append(pp, s)
	}
	pq := map[string]any{}
	for k, vs := range u.Query() {
		l := make([]any, len(vs))
		for i, v := range vs {
			l[i] = v
		}
		pq[k] = l
	}
	in["parsed_path"], in["parsed_query"], in["parsed_body"], in["truncated_body"] = pp, pq, nil, false
	return in, nil
}
