package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestH1Transport: the synchronous HTTP/1.1 client against a real
// net/http server: bodies both ways, connection reuse, a pooled connection
// the server closed (retired by the liveness peek or retried once), a
// response with Connection: close (not pooled), a large body (through the
// fallback Transport), and a cancelled request (its connection dropped).
func TestH1Transport(t *testing.T) {
	var conns atomic.Int32
	var mu sync.Mutex
	var open []net.Conn
	release := make(chan struct{})
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/close":
				w.Header().Set("Connection", "close")
			case "/block":
				<-release
			}
			b, _ := io.ReadAll(r.Body)
			_, _ = w.Write(b)
		}),
		ConnState: func(c net.Conn, s http.ConnState) {
			if s == http.StateNew {
				conns.Add(1)
				mu.Lock()
				open = append(open, c)
				mu.Unlock()
			}
		},
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { close(release); srv.Close() })
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	tr := newH1Transport(&http.Transport{DialContext: dialer.DialContext}, nil, dialer, nil)
	t.Cleanup(tr.CloseIdleConnections)
	// By name, so that the pool's key is not the connection's address.
	base := "http://localhost:" + strings.TrimPrefix(l.Addr().String(), "127.0.0.1:")
	do := func(ctx context.Context, path string, body []byte) (string, error) {
		req, _ := http.NewRequestWithContext(ctx, "POST", base+path, bytes.NewReader(body))
		resp, err := tr.RoundTrip(req)
		if err != nil {
			return "", err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		return string(b), err
	}
	kb := strings.Repeat("k", 1024)
	for i := range 3 {
		if got, err := do(context.Background(), "/echo", []byte(kb)); err != nil || got != kb {
			t.Fatalf("request %d: %q, %v", i, got[:min(len(got), 20)], err)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("3 sequential requests used %d connections, want 1", n)
	}

	// The server closes the idle connection: the next POST still works,
	// whether the liveness peek retires the connection first or the
	// POST, sent on it unchecked, is repeated because the server's TCP
	// acknowledged none of it.
	for _, peek := range []time.Duration{0, time.Hour} {
		tr.peekIdle = peek
		if _, err := do(context.Background(), "/echo", nil); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		if got, err := do(context.Background(), "/echo", []byte("after close")); err != nil || got != "after close" {
			t.Fatalf("peek after %v: after the server closed the pooled connection: %q, %v", peek, got, err)
		}
	}

	// Connection: close is honoured: the connection is not pooled.
	before := conns.Load()
	if _, err := do(context.Background(), "/close", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := do(context.Background(), "/echo", nil); err != nil {
		t.Fatal(err)
	}
	// /close reused the pooled connection; the request after it needs
	// a new one.
	if n := conns.Load() - before; n != 1 {
		t.Errorf("Connection: close then another request: %d new connections, want 1", n)
	}

	// A body beyond maxFastBody streams through the fallback intact.
	big := bytes.Repeat([]byte("0123456789abcdef"), (maxFastBody/16)+100)
	if got, err := do(context.Background(), "/echo", big); err != nil || got != string(big) {
		t.Fatalf("large body: %d bytes back, %v", len(got), err)
	}

	// A request whose context ends fails with the context's error.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := do(ctx, "/block", nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("blocked request: %v, want deadline exceeded", err)
	}
	tr.mu.Lock()
	idle := 0
	for _, cs := range tr.idle {
		idle += len(cs)
	}
	tr.mu.Unlock()
	if idle != 0 {
		t.Errorf("idle connections after the cancelled request: %d, want 0 (it took the pooled one, then dropped it)", idle)
	}
}

// TestH1PoolRetiresColdConnections: releasing a connection retires those
// at the bottom of the pool idle for idleTime or longer, and the pool
// never holds more than maxIdlePerHost per address.
func TestH1PoolRetiresColdConnections(t *testing.T) {
	tr := &h1Transport{idleTime: time.Minute, idle: map[string][]*h1Conn{}}
	t0 := time.Unix(1000, 0)
	conn := func(at time.Time) (*h1Conn, net.Conn) {
		a, b := net.Pipe()
		t.Cleanup(func() { a.Close(); b.Close() })
		return &h1Conn{addr: "app:80", c: a, idleFrom: at}, b
	}
	cold, coldPeer := conn(t0)
	older, _ := conn(t0.Add(30 * time.Second))
	tr.idle["app:80"] = []*h1Conn{cold, older}
	// release stamps now with the wall clock: both others have been idle
	// for years.
	now, _ := conn(time.Time{})
	tr.release(now, true)
	if got := tr.idle["app:80"]; len(got) != 1 || got[0] != now {
		t.Fatalf("pool after release: %d connections", len(got))
	}
	// The retired ones are closed: their peers read EOF.
	if _, err := coldPeer.Read(make([]byte, 1)); err == nil {
		t.Error("a retired connection is still open")
	}

	tr.idle["app:80"] = nil
	for range maxIdlePerHost + 1 {
		c, _ := conn(time.Time{})
		tr.release(c, true)
	}
	if n := len(tr.idle["app:80"]); n != maxIdlePerHost {
		t.Fatalf("pool holds %d, want %d", n, maxIdlePerHost)
	}
}

// TestH1NoRepeatOfReadPOST: a POST on a pooled connection that the
// server reads and then closes without an answer fails, and is not sent
// again: the server's FIN acknowledged it. A GET is repeated.
func TestH1NoRepeatOfReadPOST(t *testing.T) {
	var seen atomic.Int32
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/drop" {
			return
		}
		if seen.Add(1) > 1 {
			return // the repeated GET is answered
		}
		_, _ = io.ReadAll(r.Body)
		c, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		c.Close()
	})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	tr := newH1Transport(&http.Transport{DialContext: dialer.DialContext}, nil, dialer, nil)
	t.Cleanup(tr.CloseIdleConnections)
	tr.peekIdle = time.Hour // the pooled connection is taken unchecked
	send := func(method, path string) error {
		req, _ := http.NewRequest(method, "http://"+l.Addr().String()+path, strings.NewReader("body"))
		resp, err := tr.RoundTrip(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.Body.Close()
	}
	if err := send("POST", "/warm"); err != nil {
		t.Fatal(err)
	}
	if err := send("POST", "/drop"); err == nil {
		t.Fatal("a POST the server read and dropped succeeded")
	}
	if n := seen.Load(); n != 1 {
		t.Fatalf("the server saw the dropped POST %d times, want 1", n)
	}
	seen.Store(0)
	if err := send("POST", "/warm"); err != nil {
		t.Fatal(err)
	}
	if err := send("GET", "/drop"); err != nil {
		t.Fatalf("a GET the server dropped was not repeated: %v", err)
	}
	if n := seen.Load(); n != 2 {
		t.Fatalf("the server saw the dropped GET %d times, want 2", n)
	}
}

// TestH1OldResponseBodyStaysClosed: a response body kept after Close,
// whose connection has gone back to the pool and carries the next
// response, reads an error, never the next response's bytes.
func TestH1OldResponseBodyStaysClosed(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.URL.Path)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	tr := newH1Transport(&http.Transport{DialContext: dialer.DialContext}, nil, dialer, nil)
	t.Cleanup(tr.CloseIdleConnections)
	var old io.ReadCloser
	for _, path := range []string{"/first", "/second", "/third"} {
		req, _ := http.NewRequest("GET", "http://"+l.Addr().String()+path, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		if old != nil {
			b := make([]byte, 64)
			if n, err := old.Read(b); n > 0 || err == nil {
				t.Fatalf("the previous response's body read %q, %v", b[:n], err)
			}
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != path {
			t.Fatalf("got %q, want %q", b, path)
		}
		old = resp.Body
	}
}
