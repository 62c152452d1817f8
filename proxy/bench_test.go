package proxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"testing"

	"github.com/writmesh/writ/enforcer"
)

var kb = bytes.Repeat([]byte("x"), 1024)

func benchApp() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(kb)
	})
}

func benchGet(b *testing.B, c *http.Client, url string) {
	benchLoop(b, func() (*http.Response, error) { return c.Get(url) })
}

// benchLoop times do, one request whose answer must be a 200 with a
// 1 KiB body.
func benchLoop(b *testing.B, do func() (*http.Response, error)) {
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		resp, err := do()
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || n != 1024 {
			b.Fatalf("got %d, %d bytes", resp.StatusCode, n)
		}
	}
}

// BenchmarkDirect is the floor: client to app over loopback HTTP/1.1
// keep-alive, 1 KiB responses.
func BenchmarkDirect(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: benchApp()}
	go srv.Serve(l)
	defer srv.Close()
	benchGet(b, &http.Client{Transport: &http.Transport{}}, "http://"+l.Addr().String()+"/")
}

// BenchmarkProxyPair is client -> outbound proxy -> (mTLS HTTP/2) ->
// inbound proxy (policy decision, recorded) -> app. Allocations include
// both proxies, the app and the client, all in this process; compare with
// BenchmarkDirect.
func BenchmarkProxyPair(b *testing.B) {
	ca := newTestCA(b)
	sink := enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil })
	p := startPair(b, ca, "/ns/demo/sa/client", sink, benchApp())
	benchGet(b, &http.Client{Transport: &http.Transport{}}, "http://"+p.upstream+"/orders/1")
}

// BenchmarkProxyPairPOST is BenchmarkProxyPair with what make bench
// sends: a 1 KiB POST the app echoes. The route's default retry policy
// makes the client side keep the body for a retry.
func BenchmarkProxyPairPOST(b *testing.B) {
	ca := newTestCA(b)
	sink := enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil })
	p := startPair(b, ca, "/ns/demo/sa/client", sink, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// net/http's server ends the request body once the response
		// head is out: read it all first.
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(body)
	}))
	c := &http.Client{Transport: &http.Transport{}}
	url := "http://" + p.upstream + "/orders/1"
	benchLoop(b, func() (*http.Response, error) { return c.Post(url, "application/octet-stream", bytes.NewReader(kb)) })
}

func benchParallel(b *testing.B, url string) {
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	b.ReportAllocs()
	b.SetParallelism(8) // 16 client goroutines on 2 CPUs, like 16 connections
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := c.Get(url)
			if err != nil {
				b.Error(err)
				return
			}
			n, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || n != 1024 {
				b.Errorf("got %d, %d bytes", resp.StatusCode, n)
				return
			}
		}
	})
}

// BenchmarkDirectParallel is BenchmarkDirect with 16 concurrent clients.
func BenchmarkDirectParallel(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: benchApp()}
	go srv.Serve(l)
	defer srv.Close()
	benchParallel(b, "http://"+l.Addr().String()+"/")
}

// BenchmarkProxyPairParallel is BenchmarkProxyPair with 16 concurrent
// clients: their requests share one multiplexed HTTP/2 connection between
// the sidecars.
func BenchmarkProxyPairParallel(b *testing.B) {
	ca := newTestCA(b)
	sink := enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil })
	p := startPair(b, ca, "/ns/demo/sa/client", sink, benchApp())
	benchParallel(b, "http://"+p.upstream+"/orders/1")
}

// BenchmarkProxyPairH2Parallel is BenchmarkProxyPairParallel over an
// HTTP/2 cluster: the sidecars' hop goes through the HTTP/2 pool.
func BenchmarkProxyPairH2Parallel(b *testing.B) {
	ca := newTestCA(b)
	sink := enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil })
	p := startPairWith(b, ca, "/ns/demo/sa/client", sink, benchApp(), func(c *Cluster) { c.HTTP2 = true })
	benchParallel(b, "http://"+p.upstream+"/orders/1")
}
