package proxy

import (
	"io"
	"net"
	"net/http"
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
	if got := counter(t, p.metrics.ejections.WithLabelValues("server")); got != 1 {
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
