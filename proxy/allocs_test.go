//go:build !race

// The race detector's sync.Pool drops pooled objects at random, so
// allocation counts mean nothing under it.

package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"

	"github.com/writmesh/writ/enforcer"
)

// TestPairAllocations guards the allocations of the common request
// through a sidecar pair (client, both proxies and the app, all in this
// process, as in BenchmarkProxyPair and BenchmarkProxyPairPOST), which
// benchmarks only show. Each was cut by hand (docs/proxy.md, "Round 5:
// allocations" and "Round 6: bytes per request"); a change that adds one
// back fails here. A change that saves some should lower the limit.
func TestPairAllocations(t *testing.T) {
	ca := newTestCA(t)
	sink := enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil })
	// The apps of BenchmarkProxyPair and BenchmarkProxyPairPOST, so that
	// the counts compare with theirs.
	get, echo := benchApp(), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(body)
	})
	app := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			echo(w, r)
		} else {
			get.ServeHTTP(w, r)
		}
	})
	// Outlier detection with every detector on, so that counting tries
	// per interval is on the path measured.
	p := startPairWith(t, ca, "/ns/demo/sa/client", sink, app, func(c *Cluster) {
		c.OutlierDetection = &OutlierDetection{EnforcingFailurePercentage: 100, EnforcingConsecutiveGatewayFailure: 100}
	})
	c := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(c.CloseIdleConnections)
	url := "http://" + p.upstream + "/orders/1"
	for _, tc := range []struct {
		name  string
		limit float64
		do    func() (*http.Response, error)
	}{
		// 104 and 132 at 8465026; BenchmarkDirect, the client and app
		// alone, is 67.
		{"GET", 104, func() (*http.Response, error) { return c.Get(url) }},
		{"POST", 132, func() (*http.Response, error) {
			return c.Post(url, "application/octet-stream", bytes.NewReader(kb))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var failed error
			one := func() {
				resp, err := tc.do()
				if err != nil {
					failed = err
					return
				}
				n, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || n != int64(len(kb)) {
					failed = fmt.Errorf("got %d, %d bytes", resp.StatusCode, n)
				}
			}
			for range 50 { // warm the pools and connections
				one()
			}
			// Over many runs, the rare allocation of a background
			// goroutine (a timer, the GC) rounds away.
			got := testing.AllocsPerRun(3000, one)
			if failed != nil {
				t.Fatal(failed)
			}
			if got > tc.limit {
				t.Errorf("%.0f allocations per request through the pair, want at most %.0f", got, tc.limit)
			}
		})
	}
}
