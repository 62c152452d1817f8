package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"
)

// TestH1WatchStress runs the fast server with watchers started at almost
// every request (a 1 ms threshold) under pipelined requests, bodies read
// to their end, in part or on another goroutine, the next request sent in
// pieces while one waits, and clients that go away mid-wait: each answer
// that comes is the right one, in order (run it with -race).
func TestH1WatchStress(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		n := 0
		switch q.Get("read") {
		case "all":
			b, _ := io.ReadAll(r.Body)
			n = len(b)
		case "half":
			b := make([]byte, r.ContentLength/2)
			n, _ = io.ReadFull(r.Body, b)
		case "async":
			done := make(chan int)
			go func() {
				b, _ := io.ReadAll(r.Body)
				done <- len(b)
			}()
			n = <-done
		}
		d, _ := strconv.Atoi(q.Get("sleep"))
		select {
		case <-time.After(time.Duration(d) * time.Millisecond):
		case <-r.Context().Done():
		}
		fmt.Fprintf(w, "%s %d", q.Get("id"), n)
	})
	s, addr, wg := startWatchServer(t, h, time.Millisecond)
	reads := []string{"all", "half", "async", "none"}
	var cwg sync.WaitGroup
	for g := 0; g < 8; g++ {
		cwg.Add(1)
		go func() {
			defer cwg.Done()
			for round := 0; round < 15; round++ {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Error(err)
					return
				}
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				br := bufio.NewReader(c)
				leave := round%5 == 4
				var want []string
				req := func(i int) string {
					id := fmt.Sprintf("%d-%d-%d", g, round, i)
					read := reads[(g+round+i)%len(reads)]
					body := ""
					if read != "none" || i%2 == 0 {
						body = fmt.Sprintf("%0*d", 1+(i*37)%300, 0)
					}
					n := 0
					switch read {
					case "all", "async":
						n = len(body)
					case "half":
						n = len(body) / 2
					}
					want = append(want, fmt.Sprintf("%s %d", id, n))
					return fmt.Sprintf("POST /?id=%s&read=%s&sleep=%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", id, read, (i%3)*3, len(body), body)
				}
				// Three pipelined, then one in pieces while the last waits.
				if _, err := io.WriteString(c, req(0)+req(1)+req(2)); err != nil {
					t.Error(err)
				}
				fourth := req(3)
				io.WriteString(c, fourth[:10])
				time.Sleep(2 * time.Millisecond)
				io.WriteString(c, fourth[10:])
				if leave {
					c.Close()
					continue
				}
				readAnswers(t, br, want)
				c.Close()
			}
		}()
	}
	cwg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.shutdown(ctx)
	wg.Wait()
	if s.watched.Load() == 0 {
		t.Fatal("no watcher started")
	}
	t.Logf("%d watchers, %d bytes read ahead", s.watched.Load(), s.readAhead.Load())
}

// startWatchServer serves h on a fast server that watches waiting
// requests after after; wg counts its connections' goroutines.
func startWatchServer(t *testing.T, h http.Handler, after time.Duration) (*h1Server, string, *sync.WaitGroup) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s := newH1Server(h, newConnListener(ln.Addr()), func(net.Conn) context.Context { return context.Background() })
	s.watchAfter = after
	wg := &sync.WaitGroup{}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); s.serveConn(c) }()
		}
	}()
	return s, ln.Addr().String(), wg
}

// TestH1WatchSweeperRestarts: the sweeper that stopped when the server's last
// connection went starts again with the next one, and shutdown stops it.
func TestH1WatchSweeperRestarts(t *testing.T) {
	release := make(chan struct{})
	s, addr, wg := startWatchServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "ok")
	}), time.Millisecond)
	sweeping := func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.sweeping
	}
	for i := int64(1); i <= 2; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		waitFor(t, "a watcher", func() bool { return s.watched.Load() == i })
		release <- struct{}{}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%v %v", resp, err)
		}
		c.Close()
		waitFor(t, "the sweeper to stop", func() bool { return !sweeping() })
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, "the sweeper to start", sweeping)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.shutdown(ctx)
	wg.Wait()
	if sweeping() {
		t.Fatal("sweeping after shutdown")
	}
	s.shutdown(ctx) // a second shutdown closes nothing twice
}

// TestH1WatchPairStress: through a pair of sidecars (TLS between them)
// watching from 1 ms on, clients that stay get every answer right, in
// order, while others leave mid-wait and cancel theirs; the upstream
// connections those interrupted are not reused, so the requests after
// them all succeed.
func TestH1WatchPairStress(t *testing.T) {
	ca := newTestCA(t)
	p := startPairOpts(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		d, _ := strconv.Atoi(r.URL.Query().Get("sleep"))
		select {
		case <-time.After(time.Duration(d) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		if r.URL.Query().Get("close") != "" {
			w.Header().Set("Connection", "close")
		}
		fmt.Fprintf(w, "%s %d", r.URL.Query().Get("id"), len(b))
	}), func(*Cluster) {}, Options{WatchClientAfter: time.Millisecond})
	var wg sync.WaitGroup
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := 0; round < 10; round++ {
				c, err := net.Dial("tcp", p.upstream)
				if err != nil {
					t.Error(err)
					return
				}
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				var reqs string
				var want []string
				for i := 0; i < 3; i++ {
					id := fmt.Sprintf("%d-%d-%d", g, round, i)
					body := fmt.Sprintf("%0*d", (i*41)%200, 0)
					want = append(want, fmt.Sprintf("%s %d", id, len(body)))
					reqs += fmt.Sprintf("POST /?id=%s&sleep=%d&close=%s HTTP/1.1\r\nHost: server\r\nContent-Length: %d\r\n\r\n%s",
						id, 2+(i+g)%3*4, map[bool]string{true: "1"}[(g+i)%4 == 0], len(body), body)
				}
				io.WriteString(c, reqs)
				if round%3 == 2 {
					time.Sleep(3 * time.Millisecond)
					c.Close()
					continue
				}
				br := bufio.NewReader(c)
				readAnswers(t, br, want)
				c.Close()
			}
		}()
	}
	wg.Wait()
	for i := 0; i < 20; i++ {
		if r := <-getAsync("http://"+p.upstream+"/after", "x"); r.err != nil || r.code != 200 {
			t.Fatalf("request after: %+v", r)
		}
	}
	if o, i := outboundH1(p.client).watched.Load(), inboundH1(p.server).watched.Load(); o == 0 || i == 0 {
		t.Fatalf("watchers: %d outbound, %d inbound", o, i)
	}
}

// readAnswers reads one answer per want from br, in order: each a 200
// whose body is that want.
func readAnswers(t *testing.T, br *bufio.Reader, want []string) {
	t.Helper()
	for _, w := range want {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Errorf("want %q: %v", w, err)
			return
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 || string(b) != w {
			t.Errorf("got %d %q (%v), want %q", resp.StatusCode, b, err, w)
		}
	}
}
