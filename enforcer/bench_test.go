package enforcer

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jonboulle/clockwork"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/writmesh/writ/enforcer/enforcertest"
	"github.com/writmesh/writ/policy"
)

// benchRules is the size of the opa-envoy-style RBAC policy: one rule per
// (caller, method, path glob), the way such policies are written by hand.
const benchRules = 50

func benchPrincipal(i int) string {
	return fmt.Sprintf("spiffe://cluster.local/ns/team%d/sa/svc%d", i%10, i)
}

func benchMethod(i int) string { return []string{"GET", "POST", "PUT", "DELETE"}[i%4] }

func benchPolicy() string {
	var b strings.Builder
	b.WriteString("package envoy.authz\n\ndefault allow := false\n")
	for i := range benchRules {
		fmt.Fprintf(&b, `
allow if {
	input.attributes.source.principal == %q
	input.attributes.request.http.method == %q
	glob.match("/api/v1/svc%d/*/items/*", ["/"], input.attributes.request.http.path)
}
`, benchPrincipal(i), benchMethod(i), i)
	}
	return b.String()
}

// benchRequests builds n requests. With highCardinality every path carries
// fresh random ids, so no two requests share a cache key; otherwise ids come
// from a pool of two and there is no query, so requests repeat. About two
// thirds are allowed.
func benchRequests(n int, highCardinality bool) []*authv3.CheckRequest {
	r := rand.New(rand.NewPCG(7, 7))
	id := func() string {
		if highCardinality {
			return fmt.Sprintf("%016x", r.Uint64())
		}
		return fmt.Sprint(r.IntN(2))
	}
	reqs := make([]*authv3.CheckRequest, n)
	for i := range reqs {
		rule := r.IntN(benchRules)
		method := benchMethod(rule)
		svc := rule
		if r.IntN(3) == 0 {
			svc = (rule + 1) % benchRules // a path of another service: denied
		}
		path := fmt.Sprintf("/api/v1/svc%d/%s/items/%s", svc, id(), id())
		if highCardinality {
			path += fmt.Sprintf("?page=%d", r.IntN(10))
		}
		reqs[i] = checkRequest(peer("10.0.0.1", uint32(40000+r.IntN(20000)), benchPrincipal(rule)), peer("10.0.0.2", 8080, serverID),
			&authv3.AttributeContext_HttpRequest{
				Id: fmt.Sprint(i), Method: method, Path: path, Host: "svc.mesh", Scheme: "https", Protocol: "HTTP/2",
				Headers: map[string]string{
					":authority": "svc.mesh", ":method": method, ":path": path, ":scheme": "https",
					"user-agent": "bench/1.0", "x-request-id": fmt.Sprintf("%016x", r.Uint64()),
					"traceparent": fmt.Sprintf("00-%016x%016x-%016x-01", r.Uint64(), r.Uint64(), r.Uint64()),
				},
			}, nil)
	}
	return reqs
}

// BenchmarkCheck measures in-process Check, input building, policy and
// response mapping included, with the decision cache on and off. Run with
// -cpu 1 for per-core figures; it reports decisions/s and p99 latency.
func BenchmarkCheck(b *testing.B) {
	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "rbac.rego"), []byte(benchPolicy()), 0o644); err != nil {
		b.Fatal(err)
	}
	// Fresh ids for every iteration of the high-cardinality runs, so that
	// no request repeats however long the benchmark runs.
	uniq := make([]string, 1<<18)
	r := rand.New(rand.NewPCG(9, 9))
	for i := range uniq {
		uniq[i] = fmt.Sprintf("%016x/items/%016x", r.Uint64(), r.Uint64())
	}
	for _, ids := range []string{"high", "low"} {
		reqs := benchRequests(1<<14, ids == "high")
		prefixes := make([]string, len(reqs))
		for i, req := range reqs {
			p := req.GetAttributes().GetRequest().GetHttp().GetPath()
			prefixes[i] = p[:strings.Index(p[len("/api/v1/"):], "/")+len("/api/v1/")+1]
		}
		for _, cache := range []string{"on", "off"} {
			b.Run(fmt.Sprintf("ids=%s/cache=%s", ids, cache), func(b *testing.B) {
				size := 0
				if cache == "off" {
					size = -1
				}
				eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir, CacheSize: size})
				if err != nil {
					b.Fatal(err)
				}
				e, err := New(Options{Engine: eng, Sink: SinkFunc(func(context.Context, Decision) error { return nil }), Clock: clockwork.NewRealClock()})
				if err != nil {
					b.Fatal(err)
				}
				ctx := context.Background()
				lat := make([]time.Duration, 0, b.N)
				allowed := 0
				b.ReportAllocs()
				b.ResetTimer()
				stopCPU := reportCPU(b)
				for i := 0; i < b.N; i++ {
					req := reqs[i%len(reqs)]
					if ids == "high" {
						h := req.Attributes.Request.Http
						h.Path = prefixes[i%len(reqs)] + uniq[i%len(uniq)]
						h.Headers[":path"] = h.Path
					}
					t0 := time.Now()
					_, d := e.Check(ctx, req)
					lat = append(lat, time.Since(t0))
					if d.Result == ResultAllow {
						allowed++
					}
				}
				b.StopTimer()
				stopCPU()
				if b.N >= 100 && (allowed == 0 || allowed == b.N) {
					b.Fatalf("%d of %d allowed: the benchmark does not exercise the policy", allowed, b.N)
				}
				slices.Sort(lat)
				b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
			})
		}
		// The same requests the way opa-envoy-plugin evaluates them in
		// process: protojson, JSON decode, Go maps as input, a prepared
		// query with OPA's defaults, no cache. The ratio of its ns/op to
		// the runs above is Writ's speed-up.
		b.Run(fmt.Sprintf("ids=%s/baseline=opa-envoy", ids), func(b *testing.B) {
			ctx := context.Background()
			pq, err := rego.New(rego.Query("data.envoy.authz.allow"), rego.Module("rbac.rego", benchPolicy())).PrepareForEval(ctx)
			if err != nil {
				b.Fatal(err)
			}
			lat := make([]time.Duration, 0, b.N)
			allowed := 0
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				req := reqs[i%len(reqs)]
				if ids == "high" {
					h := req.Attributes.Request.Http
					h.Path = prefixes[i%len(reqs)] + uniq[i%len(uniq)]
					h.Headers[":path"] = h.Path
				}
				t0 := time.Now()
				in, err := enforcertest.OPAEnvoyInput(req)
				if err != nil {
					b.Fatal(err)
				}
				rs, err := pq.Eval(ctx, rego.EvalInput(in))
				if err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
				if len(rs) == 1 && rs[0].Expressions[0].Value == true {
					allowed++
				}
			}
			b.StopTimer()
			if b.N >= 100 && (allowed == 0 || allowed == b.N) {
				b.Fatalf("%d of %d allowed", allowed, b.N)
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
		})
	}
}
