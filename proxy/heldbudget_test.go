package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/regotest"
)

// dialMesh opens a raw HTTP/1.1 mTLS connection to an inbound port, for
// a client that sends its request by hand (slowly, or not at all).
func dialMesh(t *testing.T, ca *testCA, addr string) *tls.Conn {
	t.Helper()
	src := ca.source(t, "/ns/demo/sa/client")
	cfg := svidtls.ClientConfig(src, src, svidtls.AuthorizeMemberOf(td), clockwork.NewRealClock())
	cfg.NextProtos = []string{"http/1.1"}
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// Only ends a failing test.
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

// startBody sends a POST's head declaring n bytes of JSON, and the
// first bytes of its body. The policy lets it in whatever the body, so
// that a prefix too short to parse is allowed too.
func startBody(t *testing.T, c *tls.Conn, n int, first []byte) {
	t.Helper()
	if _, err := fmt.Fprintf(c, "POST /orders HTTP/1.1\r\nHost: server\r\nX-Let-In: yes\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", n, first); err != nil {
		t.Fatal(err)
	}
}

func readStatus(t *testing.T, c *tls.Conn) (int, string) {
	t.Helper()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// jsonBody is a body the test policy allows (action read) or denies,
// padded to n bytes.
func jsonBody(action string, n int) []byte {
	b := []byte(`{"action": "` + action + `", "pad": "`)
	b = append(b, strings.Repeat("x", n-len(b)-2)...)
	return append(b, `"}`...)
}

// TestHeldBodyBudget: the bodies all requests hold for their checks are
// bounded together. Two slow clients holding max_request_bytes each fill
// Options.MaxHeldBodyBytesTotal; the next request with a body is answered
// 503 at once (HTTP/1.1 and HTTP/2), counted, never reaching the app;
// once they finish the budget is whole, and every other way a hold ends
// (denied, 413, the client gone) gives its bytes back too.
func TestHeldBodyBudget(t *testing.T) {
	const limit = 32 << 10
	ca := newTestCA(t)
	app := &bodyApp{}
	p := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: serveApp(t, app), RequestBody: RequestBody{MaxBytes: limit}}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, bodyRego, &decisions{}), MaxHeldBodyBytesTotal: 2 * limit})
	addr := p.Addr("mesh")
	url := "https://" + addr + "/orders"
	held := func() int64 { return p.bodies.used.Load() }
	whole := func(t *testing.T) {
		t.Helper()
		waitFor(t, "every held byte given back", func() bool { return held() == 0 })
		if g := testutil.ToFloat64(p.metrics.heldBytes); g != 0 {
			t.Errorf("writ_held_body_bytes %v after every hold ended, want 0", g)
		}
	}
	post := func(t *testing.T, h2 bool, body io.Reader) (int, string) {
		t.Helper()
		req, err := http.NewRequest("POST", url, body)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = "server"
		req.Header.Set("Content-Type", "application/json")
		resp, err := meshClient(t, ca, h2).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	full := jsonBody("read", limit)
	var slow []*tls.Conn
	for range 2 {
		c := dialMesh(t, ca, addr)
		startBody(t, c, len(full), full[:16])
		slow = append(slow, c)
	}
	waitFor(t, "two bodies held", func() bool { return held() == 2*limit })
	for _, h2 := range []bool{false, true} {
		status, msg := post(t, h2, bytes.NewReader(jsonBody("read", 100)))
		if status != http.StatusServiceUnavailable || !strings.Contains(msg, "limit") {
			t.Fatalf("h2 %v: with the budget full, status %d %q, want 503 naming the limit", h2, status, msg)
		}
	}
	if _, _, n := app.last(); n != 0 {
		t.Fatalf("the app got %d requests while every body was refused or held", n)
	}
	if n := testutil.ToFloat64(p.metrics.heldOverflows); n != 2 {
		t.Errorf("writ_held_body_overflow_total %v, want 2", n)
	}
	for i, c := range slow {
		if _, err := c.Write(full[16:]); err != nil {
			t.Fatal(err)
		}
		if status, msg := readStatus(t, c); status != http.StatusOK {
			t.Fatalf("slow client %d: status %d %q, want 200", i, status, msg)
		}
	}
	if got, _, n := app.last(); n != 2 || !bytes.Equal(got, full) {
		t.Fatalf("app got %d bodies, the last %d bytes; want 2 of %d", n, len(got), len(full))
	}
	whole(t)

	// TestHeldBodyDeadline checks the 408s' holds end whole.
	for _, tt := range []struct {
		name string
		run  func(t *testing.T)
	}{
		{"allowed over HTTP/2", func(t *testing.T) {
			if status, msg := post(t, true, chunked{bytes.NewReader(jsonBody("read", 1000))}); status != http.StatusOK {
				t.Fatalf("status %d %q, want 200", status, msg)
			}
		}},
		{"denied", func(t *testing.T) {
			if status, msg := post(t, false, bytes.NewReader(jsonBody("write", 1000))); status != http.StatusForbidden {
				t.Fatalf("status %d %q, want 403", status, msg)
			}
		}},
		{"413 once past the limit", func(t *testing.T) {
			if status, msg := post(t, false, chunked{bytes.NewReader(jsonBody("read", limit+1))}); status != http.StatusRequestEntityTooLarge {
				t.Fatalf("status %d %q, want 413", status, msg)
			}
		}},
		{"client gone mid-body", func(t *testing.T) {
			c := dialMesh(t, ca, addr)
			startBody(t, c, len(full), full[:16])
			waitFor(t, "body held", func() bool { return held() == limit })
			c.Close()
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.run(t)
			whole(t)
		})
	}
}

// panicBody panics on Read, as a broken body reader might.
type panicBody struct{}

func (panicBody) Read([]byte) (int, error) { panic("read") }
func (panicBody) Close() error             { return nil }

// TestHoldBodyReleasesOnPanic: a hold that panics part way gives back
// what it took (the request's deferred release covers panics after it).
func TestHoldBodyReleasesOnPanic(t *testing.T) {
	b := &bodyBudget{max: 1 << 20, bytes: prometheus.NewGauge(prometheus.GaugeOpts{Name: "g"}), overflows: prometheus.NewCounter(prometheus.CounterOpts{Name: "c"})}
	r, err := http.NewRequest("POST", "/", panicBody{})
	if err != nil {
		t.Fatal(err)
	}
	r.ContentLength = 1000
	func() {
		defer func() { _ = recover() }()
		_, _ = holdBody(r, RequestBody{MaxBytes: 4 << 10}, b)
		t.Fatal("no panic")
	}()
	if n := b.used.Load(); n != 0 {
		t.Fatalf("%d bytes still taken after a panicking hold", n)
	}
}

// TestHeldBodyRestIdleBound: after a partial hold the rest of the body
// streams to the app under bodyIdleTimeout, restarted by every read: a
// client that stops after the checked prefix has its request ended and,
// on HTTP/1.1, its connection closed (the guard, far above the bound,
// only ends a failing test), while one that keeps sending, for longer in
// all than the bound, gets its body through whole.
func TestHeldBodyRestIdleBound(t *testing.T) {
	defer func(d time.Duration) { bodyIdleTimeout = d }(bodyIdleTimeout)
	bodyIdleTimeout = 600 * time.Millisecond
	ca := newTestCA(t)
	app := &bodyApp{}
	dec := &decisions{}
	p := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: serveApp(t, app),
		RequestBody: RequestBody{MaxBytes: 16, AllowPartialMessage: true}}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, bodyRego, dec)})
	addr := p.Addr("mesh")
	body := jsonBody("read", 1000)
	// closed reads what the proxy sends until the connection ends, which
	// must be before the guard.
	closed := func(t *testing.T, c *tls.Conn) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("connection still open after the client stopped mid-body (read %q): %v", b, err)
		}
		if bytes.HasPrefix(b, []byte("HTTP/1.1 200")) {
			t.Fatalf("a cut body answered %q", b)
		}
	}
	for _, tt := range []struct {
		name string
		run  func(t *testing.T)
	}{
		{"content-length, stops after the prefix", func(t *testing.T) {
			c := dialMesh(t, ca, addr)
			startBody(t, c, len(body), body[:32])
			closed(t, c)
		}},
		{"chunked, stops after the prefix", func(t *testing.T) {
			c := dialMesh(t, ca, addr)
			if _, err := fmt.Fprintf(c, "POST /orders HTTP/1.1\r\nHost: server\r\nX-Let-In: yes\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n%s\r\n", body[:32]); err != nil {
				t.Fatal(err)
			}
			closed(t, c)
		}},
		{"http2, stops after the prefix", func(t *testing.T) {
			pr, pw := io.Pipe()
			defer pw.Close()
			go func() { _, _ = pw.Write(body[:32]) }()
			req, err := http.NewRequest("POST", "https://"+addr+"/orders", pr)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = "server"
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("X-Let-In", "yes")
			resp, err := meshClient(t, ca, true).Do(req)
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "Client.Timeout") {
					t.Fatalf("stream not ended after the client stopped mid-body: %v", err)
				}
				return // reset: ended
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && err == nil {
				t.Fatalf("a cut body answered %d %q", resp.StatusCode, b)
			}
		}},
		{"keeps coming", func(t *testing.T) {
			c := dialMesh(t, ca, addr)
			startBody(t, c, len(body), body[:16])
			for off := 16; off < len(body); off += 123 {
				time.Sleep(bodyIdleTimeout / 6)
				if _, err := c.Write(body[off:min(off+123, len(body))]); err != nil {
					t.Fatal(err)
				}
			}
			if status, msg := readStatus(t, c); status != http.StatusOK {
				t.Fatalf("status %d %q, want 200", status, msg)
			}
			if got, _, _ := app.last(); !bytes.Equal(got, body) {
				t.Fatalf("app got %d bytes, want all %d", len(got), len(body))
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dec.mu.Lock()
			before := len(dec.got)
			dec.mu.Unlock()
			tt.run(t)
			waitFor(t, "held bytes given back", func() bool { return p.bodies.used.Load() == 0 })
			// The prefix was checked and allowed: the rest was streaming.
			dec.mu.Lock()
			defer dec.mu.Unlock()
			if len(dec.got) != before+1 || dec.got[before].Result != enforcer.ResultAllow {
				t.Fatalf("decisions %+v, want one allow", dec.got[before:])
			}
		})
	}
}

// deadlineWriter records the read deadlines a ResponseController sets.
type deadlineWriter struct {
	http.ResponseWriter
	sets int
}

func (w *deadlineWriter) SetReadDeadline(time.Time) error { w.sets++; return nil }

// TestReplayBodyStopsMovingAtEnd: once the rest of a partially held body
// has ended, a read after it (the HTTP/1.1 transport reads again after a
// Content-Length body's last bytes) does not set the read deadline
// again, however long since it last moved: net/http's HTTP/1.1 server
// clears the deadline when the body ends and starts a background read
// whose failure cancels the request, so a deadline set again would cut
// an app that answers more than bodyIdleTimeout after the body ended.
func TestReplayBodyStopsMovingAtEnd(t *testing.T) {
	w := &deadlineWriter{}
	b := &replayBody{held: []byte("ab"), rest: io.NopCloser(strings.NewReader("cd"))}
	b.watch(http.NewResponseController(w))
	b.until = time.Time{} // as if the slack had passed: the next read of the rest moves it
	if got, err := io.ReadAll(b); err != nil || string(got) != "abcd" {
		t.Fatalf("read %q, %v", got, err)
	}
	if w.sets != 2 {
		t.Fatalf("%d deadlines set by the watch and the read, want 2", w.sets)
	}
	b.until = time.Time{}
	if n, err := b.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Fatalf("read after the end: %d, %v", n, err)
	}
	if w.sets != 2 {
		t.Fatal("a read after the end of the body set the read deadline again")
	}
}

// TestNegativeHeldBodyBudgetRefused: a negative
// Options.MaxHeldBodyBytesTotal is an error, not a budget that refuses
// every body (or, taken as zero, the default).
func TestNegativeHeldBodyBudgetRefused(t *testing.T) {
	ca := newTestCA(t)
	p, err := New(&Config{}, Options{Source: ca.source(t, "/ns/demo/sa/server"), MaxHeldBodyBytesTotal: -1})
	if err == nil {
		p.Close()
		t.Fatal("New with a negative MaxHeldBodyBytesTotal: no error")
	}
	if !strings.Contains(err.Error(), "MaxHeldBodyBytesTotal") {
		t.Fatalf("New: %v, want it to name MaxHeldBodyBytesTotal", err)
	}
}
