package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/writmesh/writ/enforcer/regotest"
	"github.com/writmesh/writ/proxy"
)

// TestProxyRotationUnderLoad: steady HTTP load and a new TCP connection
// (a new mTLS handshake) every simulated minute pass through the pair
// while the clock moves through 100 minutes, three rotations of one-hour
// SVIDs. No request fails.
func TestProxyRotationUnderLoad(t *testing.T) {
	m := startMesh(t)
	clock := m.env.Clock
	app := serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					fmt.Fprintf(c, "echo %s\n", sc.Text())
				}
			}()
		}
	}()
	srv, _ := runProxy(t, &proxy.Config{Inbound: []proxy.Inbound{
		{Name: "http", Address: "127.0.0.1:0", Service: "orders", App: app},
		{Name: "tcp", Address: "127.0.0.1:0", Service: "orders", App: tl.Addr().String()},
	}}, proxy.Options{Source: m.sources[meshServerID], Enforcer: regotest.Enforcer(t, meshPolicy, &decisionLog{}), Clock: clock})
	peer := []string{meshServerID.String()}
	cfg := &proxy.Config{
		Clusters: []proxy.Cluster{
			{Name: "orders", Endpoints: []proxy.Endpoint{{Address: srv.Addr("http")}}, PeerIDs: peer},
			{Name: "orders-tcp", Endpoints: []proxy.Endpoint{{Address: srv.Addr("tcp")}}, PeerIDs: peer},
		},
		Outbound: []proxy.Outbound{{Name: "tcp", Address: "127.0.0.1:0", Protocol: "tcp", Cluster: "orders-tcp"}},
	}
	cfg.AddUpstream("orders", "127.0.0.1:0")
	cli, _ := runProxy(t, cfg, proxy.Options{Source: m.sources[meshClientID], Clock: clock})

	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	c := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Get("http://" + cli.Addr("upstream:orders") + "/")
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				} else {
					ok.Add(1)
				}
			}
		})
	}
	tcpRoundTrip := func(step string) {
		t.Helper()
		conn, err := net.DialTimeout("tcp", cli.Addr("tcp"), 5*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "hi\n")
		if line, err := bufio.NewReader(conn).ReadString('\n'); err != nil || line != "echo hi\n" {
			t.Fatalf("%s: new mTLS connection through the pair: %q %v", step, line, err)
		}
	}
	// settle waits until neither workload's SVID is overdue for renewal,
	// letting the clock creep on in 5 s steps while the agent lags.
	settle := func(step string) {
		t.Helper()
		for i := 0; ; i++ {
			due := false
			for _, src := range []*workloadapi.X509Source{m.sources[meshServerID], m.sources[meshClientID]} {
				s, err := src.GetX509SVID()
				if err != nil {
					t.Fatal(err)
				}
				leaf := s.Certificates[0]
				if leaf.NotAfter.Sub(clock.Now()) < leaf.NotAfter.Sub(leaf.NotBefore)/2-2*time.Minute {
					due = true
				}
			}
			if !due {
				return
			}
			if i >= 12*20 {
				t.Fatalf("%s: the agent did not renew within a minute", step)
			}
			time.Sleep(5 * time.Millisecond)
			if i%20 == 19 {
				clock.Advance(5 * time.Second)
			}
		}
	}
	serials := map[string]bool{}
	for i := range 100 {
		clock.Advance(time.Minute)
		step := fmt.Sprintf("minute %d", i+1)
		settle(step)
		tcpRoundTrip(step)
		s, _ := m.sources[meshServerID].GetX509SVID()
		serials[s.Certificates[0].SerialNumber.String()] = true
	}
	close(stop)
	wg.Wait()
	if len(serials) < 4 {
		t.Fatalf("server SVID rotated %d times, want at least 3", len(serials)-1)
	}
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("%d requests failed (first: %v), %d succeeded", failed.Load(), firstErr.Load(), ok.Load())
	}
	t.Logf("%d requests and 100 new mTLS connections across %d server SVIDs", ok.Load(), len(serials))
}
