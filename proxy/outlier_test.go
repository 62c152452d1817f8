package proxy

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
)

// TestOutlierSweepsAndBackoff: an ejection ends at the first sweep
// (every interval from the cluster's start) after base × backoff; the
// backoff grows per ejection, shrinks by one per interval back in the
// pool, and the time is capped at max_ejection_time.
func TestOutlierSweepsAndBackoff(t *testing.T) {
	s := int64(time.Second)
	off := 0
	c := &cluster{cfg: Cluster{OutlierDetection: &OutlierDetection{ConsecutiveGatewayFailure: 1, EnforcingConsecutiveGatewayFailure: 100,
		EnforcingConsecutive5xx: &off, Interval: Duration(10 * time.Second), BaseEjectionTime: Duration(15 * time.Second),
		MaxEjectionTime: Duration(40 * time.Second), MaxEjectionPercent: 50}}, odStart: 1000 * s}
	e, other := &endpoint{addr: "a"}, &endpoint{addr: "b"}
	c.eps = []*endpoint{e, other}
	steps := []struct {
		name      string
		at        int64 // seconds after odStart
		status    int
		wantUntil int64 // seconds after odStart; -1: unchanged
	}{
		{"a 500 is no gateway failure", 3, 500, -1},
		{"first ejection: 15 s, to the sweep at 20 s", 3, 502, 20},
		{"failures while ejected change nothing", 12, 504, 20},
		{"second ejection at once: 30 s, sweep at 60", 21, 503, 60},
		{"third: capped at 40 s, sweep at 110", 61, 503, 110},
		{"after 6 intervals back the backoff is 0 again: 15 s", 170, 503, 190},
	}
	for _, st := range steps {
		before := e.ejectedUntil.Load()
		c.outcome(e, st.status, c.odStart+st.at*s)
		got := e.ejectedUntil.Load()
		switch {
		case st.wantUntil < 0 && got != before:
			t.Fatalf("%s: ejected until %d s", st.name, (got-c.odStart)/s)
		case st.wantUntil >= 0 && got != c.odStart+st.wantUntil*s:
			t.Fatalf("%s: ejected until %d s, want %d s", st.name, (got-c.odStart)/s, st.wantUntil)
		}
	}
	if e.in(c.odStart+189*s) || !e.in(c.odStart+190*s) {
		t.Fatal("the endpoint is not back exactly at its sweep")
	}
	// The other endpoint may not go while this one is out (50 % of 2).
	c.outcome(other, 503, c.odStart+180*s)
	if !other.in(c.odStart + 180*s) {
		t.Fatal("max_ejection_percent let both endpoints out")
	}
}

// TestGatewayFailureEjection: over real sockets, an endpoint answering
// 500 is never ejected by gateway-failure detection alone, while one
// answering 502 is, after consecutive_gateway_failure answers in a row;
// an endpoint nobody listens on (failed connections) is too. They come
// back at the sweep after their ejection time on the injected clock,
// not before.
func TestGatewayFailureEjection(t *testing.T) {
	ca := newTestCA(t)
	clock := clockwork.NewFakeClock()
	var status = make(chan int, 1)
	status <- 500
	code := func() int { c := <-status; status <- c; return c }
	setCode := func(c int) { <-status; status <- c }
	good := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "good") }))
	bad := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(code())
		io.WriteString(w, "bad")
	}))
	off := 0
	cfg := &Config{Clusters: []Cluster{{Name: "server",
		Endpoints: []Endpoint{{Address: bad.server.Addr("mesh")}, {Address: good.server.Addr("mesh")}},
		PeerIDs:   []string{"spiffe://example.org/ns/demo/sa/server"},
		OutlierDetection: &OutlierDetection{ConsecutiveGatewayFailure: 2, EnforcingConsecutiveGatewayFailure: 100, EnforcingConsecutive5xx: &off,
			Interval: Duration(10 * time.Second), BaseEjectionTime: Duration(15 * time.Second), MaxEjectionPercent: 50},
	}}}
	cfg.Routes = []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}}}}}}}
	cfg.Outbound = []Outbound{{Name: "out", Address: "127.0.0.1:0", Route: "r"}}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), Clock: clock, Registry: prometheus.NewRegistry()})
	get := func() (int, string) {
		resp, err := http.Get("http://" + p.Addr("out") + "/")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	bads := func(n int) int {
		k := 0
		for range n {
			if _, b := get(); b == "bad" {
				k++
			}
		}
		return k
	}
	if k := bads(20); k != 10 {
		t.Fatalf("answering 500: %d of 20 requests reached the bad endpoint, want 10 (never ejected)", k)
	}
	setCode(502)
	if k := bads(4); k != 2 {
		t.Fatalf("answering 502: %d of 4 requests before ejection, want 2", k)
	}
	if k := bads(10); k != 0 {
		t.Fatalf("%d requests reached the ejected endpoint", k)
	}
	if got := counter(t, p.metrics.ejections.WithLabelValues("server", detectorGateway)); got != 1 {
		t.Fatalf("ejections = %v, want 1", got)
	}
	setCode(200)
	clock.Advance(16 * time.Second) // ejection time over, next sweep at 20 s
	if k := bads(10); k != 0 {
		t.Fatalf("%d requests reached the endpoint between its ejection time and the sweep", k)
	}
	clock.Advance(4 * time.Second)
	if k := bads(10); k != 5 {
		t.Fatalf("after the sweep %d of 10 requests reached the endpoint, want 5", k)
	}

	// Failed connections are gateway failures too.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := ln.Addr().String()
	ln.Close()
	cfg2 := *cfg
	cfg2.Clusters = []Cluster{cfg.Clusters[0]}
	cfg2.Clusters[0].Endpoints = []Endpoint{{Address: deadAddr}, {Address: good.server.Addr("mesh")}}
	if err := p.Update(&cfg2); err != nil {
		t.Fatal(err)
	}
	fails := 0
	for range 10 {
		if c, _ := get(); c != 200 {
			fails++
		}
	}
	if fails != 2 {
		t.Fatalf("%d of 10 requests failed with one endpoint unreachable, want 2 (then ejected)", fails)
	}
}

// TestIntervalDetectors: the sweep judges each endpoint's tries of the
// interval that just ended, by success rate and by failure percentage,
// with Envoy's volume, host-count and enforcing rules.
func TestIntervalDetectors(t *testing.T) {
	s := int64(time.Second)
	p := func(n int) *int { return &n }
	type host struct{ tries, fails uint64 }
	healthy := host{100, 0}
	tests := []struct {
		name    string
		od      OutlierDetection
		hosts   []host
		rand    int // what the injected random source returns
		wantOut []int
		wantBy  string
	}{
		{"failure percentage at 90 % ejects", OutlierDetection{EnforcingSuccessRate: p(0), EnforcingFailurePercentage: 100},
			[]host{{100, 90}, healthy, healthy, healthy, healthy}, 0, []int{0}, detectorFP},
		{"failure percentage exactly at the threshold ejects", OutlierDetection{EnforcingSuccessRate: p(0), EnforcingFailurePercentage: 100},
			[]host{{100, 85}, healthy, healthy, healthy, healthy}, 0, []int{0}, detectorFP},
		{"failure percentage below the threshold", OutlierDetection{EnforcingSuccessRate: p(0), EnforcingFailurePercentage: 100},
			[]host{{100, 84}, healthy, healthy, healthy, healthy}, 0, nil, ""},
		{"failure percentage is off by default", OutlierDetection{EnforcingSuccessRate: p(0)},
			[]host{{100, 100}, healthy, healthy, healthy, healthy}, 0, nil, ""},
		{"failure percentage needs 5 hosts with 50 tries", OutlierDetection{EnforcingSuccessRate: p(0), EnforcingFailurePercentage: 100},
			[]host{{100, 100}, healthy, healthy, healthy, {49, 0}}, 0, nil, ""},
		{"failure percentage with its own volume and host count", OutlierDetection{EnforcingSuccessRate: p(0), EnforcingFailurePercentage: 100,
			FailurePercentageRequestVolume: 10, FailurePercentageMinimumHosts: 2, FailurePercentageThreshold: p(50)},
			[]host{{10, 5}, {10, 0}, {9, 9}}, 0, []int{0}, detectorFP},
		{"enforcing 30 %: the draw 29 ejects", OutlierDetection{EnforcingSuccessRate: p(0), EnforcingFailurePercentage: 30},
			[]host{{100, 90}, healthy, healthy, healthy, healthy}, 29, []int{0}, detectorFP},
		{"enforcing 30 %: the draw 30 does not", OutlierDetection{EnforcingSuccessRate: p(0), EnforcingFailurePercentage: 30},
			[]host{{100, 90}, healthy, healthy, healthy, healthy}, 30, nil, ""},
		// One outlier among five is always 2 standard deviations below
		// the mean (population deviation, as Envoy).
		{"success rate on by default: 2 stdev below", OutlierDetection{},
			[]host{{100, 30}, healthy, healthy, healthy, healthy}, 0, []int{0}, detectorSR},
		{"success rate with a factor of 2.1 stdev", OutlierDetection{SuccessRateStdevFactor: 2100},
			[]host{{100, 30}, healthy, healthy, healthy, healthy}, 0, nil, ""},
		{"success rate needs 5 hosts with 100 tries", OutlierDetection{},
			[]host{{100, 30}, healthy, healthy, healthy, {99, 0}}, 0, nil, ""},
		{"success rate off", OutlierDetection{EnforcingSuccessRate: p(0)},
			[]host{{100, 30}, healthy, healthy, healthy, healthy}, 0, nil, ""},
		{"all equally bad: nobody is an outlier", OutlierDetection{},
			[]host{{100, 50}, {100, 50}, {100, 50}, {100, 50}, {100, 50}}, 0, nil, ""},
		{"max_ejection_percent bounds the interval detectors", OutlierDetection{EnforcingSuccessRate: p(0), EnforcingFailurePercentage: 100, MaxEjectionPercent: 20},
			[]host{{100, 90}, {100, 90}, healthy, healthy, healthy}, 0, []int{0}, detectorFP},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			od := tt.od
			od.Interval = Duration(10 * time.Second)
			od.BaseEjectionTime = Duration(25 * time.Second)
			if od.MaxEjectionPercent == 0 {
				od.MaxEjectionPercent = 100
			}
			var by []string
			c := &cluster{cfg: Cluster{OutlierDetection: &od}, odStart: 1000 * s, rand: func(int) int { return tt.rand },
				onEject: func(d string) { by = append(by, d) }}
			c.nextSweep.Store(c.odStart + 10*s)
			for i, h := range tt.hosts {
				e := &endpoint{addr: string(rune('a' + i))}
				e.window.Store(h.tries<<32 | h.fails)
				c.eps = append(c.eps, e)
			}
			c.sweep(c.odStart + 9*s)
			if c.eps[0].ejectedUntil.Load() != 0 {
				t.Fatal("judged before the interval ended")
			}
			c.sweep(c.odStart + 13*s) // the first try after the sweep at 10 s
			var out []int
			for i, e := range c.eps {
				if !e.in(c.odStart + 10*s) {
					out = append(out, i)
					// Ejected at the sweep (10 s) for 25 s: back at the
					// sweep at 40 s.
					if got := (e.ejectedUntil.Load() - c.odStart) / s; got != 40 {
						t.Errorf("endpoint %d ejected until %d s, want 40 s", i, got)
					}
				}
				if w := e.window.Load(); w != 0 {
					t.Errorf("endpoint %d: the interval's count was not reset", i)
				}
			}
			if fmt.Sprint(out) != fmt.Sprint(tt.wantOut) {
				t.Fatalf("ejected %v, want %v", out, tt.wantOut)
			}
			if len(out) > 0 && (len(by) != len(out) || by[0] != tt.wantBy) {
				t.Fatalf("ejections by %v, want %s", by, tt.wantBy)
			}
			if got := (c.nextSweep.Load() - c.odStart) / s; got != 20 {
				t.Fatalf("next sweep at %d s, want 20 s", got)
			}
		})
	}
}

// startFlaky starts count server sidecars for the outlier tests: the
// first answers 503 to nine requests in ten, the others 200; the bodies
// say which.
func startFlaky(t *testing.T, ca *testCA, count int) []Endpoint {
	var eps []Endpoint
	for i := range count {
		var n atomic.Int64
		app := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if i == 0 && n.Add(1)%10 != 0 {
				w.WriteHeader(http.StatusServiceUnavailable)
			}
			io.WriteString(w, map[bool]string{true: "bad", false: "good"}[i == 0])
		})
		pr := startPair(t, ca, "/ns/demo/sa/client", nil, app)
		eps = append(eps, Endpoint{Address: pr.server.Addr("mesh")})
	}
	return eps
}

// TestIntervalDetectorEjection: over real sockets, with five endpoints
// of which one fails nine requests in ten and consecutive-failure
// detection off, each interval detector alone ejects the bad endpoint at
// the sweep after the interval in which it failed, and the endpoint
// comes back at the sweep after its ejection time on the injected clock.
func TestIntervalDetectorEjection(t *testing.T) {
	ca := newTestCA(t)
	eps := startFlaky(t, ca, 5)
	off, on := 0, 100
	for _, tt := range []struct {
		name     string
		detector string
		od       OutlierDetection
	}{
		{"failure percentage", detectorFP, OutlierDetection{EnforcingSuccessRate: &off, EnforcingFailurePercentage: on, FailurePercentageRequestVolume: 10}},
		{"success rate", detectorSR, OutlierDetection{EnforcingSuccessRate: &on, SuccessRateRequestVolume: 10}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := clockwork.NewFakeClock()
			od := tt.od
			od.EnforcingConsecutive5xx = &off
			od.Interval = Duration(10 * time.Second)
			od.BaseEjectionTime = Duration(25 * time.Second)
			od.MaxEjectionPercent = 20
			cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: eps,
				PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}, OutlierDetection: &od}}}
			cfg.Routes = []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}}}}}}}
			cfg.Outbound = []Outbound{{Name: "out", Address: "127.0.0.1:0", Route: "r"}}
			p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), Clock: clock, Registry: prometheus.NewRegistry()})
			bads := func(n int) int {
				k := 0
				for range n {
					resp, err := http.Get("http://" + p.Addr("out") + "/")
					if err != nil {
						t.Fatal(err)
					}
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if string(b) == "bad" {
						k++
					}
				}
				return k
			}
			if k := bads(100); k != 20 {
				t.Fatalf("first interval: %d of 100 requests reached the bad endpoint, want 20", k)
			}
			clock.Advance(10 * time.Second) // the sweep at 10 s
			if k := bads(50); k != 0 {
				t.Fatalf("after the sweep %d of 50 requests reached the bad endpoint", k)
			}
			if got := counter(t, p.metrics.ejections.WithLabelValues("server", tt.detector)); got != 1 {
				t.Fatalf("ejections by %s = %v, want 1", tt.detector, got)
			}
			clock.Advance(29 * time.Second) // 39 s: ejection time over, sweep at 40 s
			if k := bads(50); k != 0 {
				t.Fatalf("%d requests reached the endpoint before its sweep", k)
			}
			clock.Advance(time.Second)
			if k := bads(50); k != 10 {
				t.Fatalf("after its return %d of 50 requests reached the endpoint, want 10", k)
			}
		})
	}
}
