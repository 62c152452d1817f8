package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// parseWithNetHTTP reads head the way net/http's server does: ReadRequest,
// the server's Host checks, Host removed from the header.
func parseWithNetHTTP(head []byte) (*http.Request, error) {
	r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
	if err != nil {
		return nil, err
	}
	delete(r.Header, "Host")
	return r, nil
}

// checkAgainstNetHTTP fails when the fast path accepted head and net/http
// reads it differently or not at all.
func checkAgainstNetHTTP(t *testing.T, head []byte) {
	t.Helper()
	got, verdict := parseRequestHead(head, nil)
	if verdict != headOK {
		return
	}
	want, err := parseWithNetHTTP(head)
	if err != nil {
		t.Fatalf("fast path accepted %q, net/http refused it: %v", head, err)
	}
	if !reflect.DeepEqual(got.URL, want.URL) {
		t.Fatalf("%q: URL %#v, net/http %#v", head, got.URL, want.URL)
	}
	if got.Method != want.Method || got.URL.String() != want.URL.String() || got.Host != want.Host ||
		got.RequestURI != want.RequestURI || got.Proto != want.Proto || got.ContentLength != want.ContentLength || got.Close != want.Close {
		t.Fatalf("%q: got %s %s host %q uri %q %s len %d close %v, net/http %s %s host %q uri %q %s len %d close %v", head,
			got.Method, got.URL, got.Host, got.RequestURI, got.Proto, got.ContentLength, got.Close,
			want.Method, want.URL, want.Host, want.RequestURI, want.Proto, want.ContentLength, want.Close)
	}
	if len(got.Header) != len(want.Header) || !reflect.DeepEqual(map[string][]string(got.Header), map[string][]string(want.Header)) {
		t.Fatalf("%q: header %v, net/http %v", head, got.Header, want.Header)
	}
}

// TestParseRequestHeadFields: heads with more fields than h1Req holds,
// exactly as many, and repeated names read as net/http reads them.
func TestParseRequestHeadFields(t *testing.T) {
	var b strings.Builder
	for i := range 2 * h1Vals {
		fmt.Fprintf(&b, "X-%d: %d\r\nx-r: %d\r\n", i%5, i, i)
	}
	for _, head := range []string{
		"POST /a HTTP/1.1\r\nHost: o\r\nContent-Length: 0\r\n" + b.String() + "\r\n",
		"GET /a HTTP/1.1\r\nHost: o\r\n" + strings.Repeat("X-A: 1\r\n", h1Vals-1) + "\r\n",
		"GET /a HTTP/1.1\r\nHost: o\r\n" + strings.Repeat("X-A: 1\r\n", h1Vals) + "\r\n",
	} {
		if _, v := parseRequestHead([]byte(head), nil); v != headOK {
			t.Fatalf("%q: verdict %d", head, v)
		}
		checkAgainstNetHTTP(t, []byte(head))
	}
}

func TestParseRequestHead(t *testing.T) {
	tests := []struct {
		name string
		head string
		want headVerdict
	}{
		{"get", "GET /a?b=c HTTP/1.1\r\nHost: orders\r\nX-A: 1\r\nx-a: 2\r\n\r\n", headOK},
		{"post with length", "POST / HTTP/1.1\r\nHost: o:80\r\nContent-Length: 5\r\n\r\n", headOK},
		{"absolute form", "GET http://orders/x HTTP/1.1\r\nHost: other\r\n\r\n", headOK},
		{"pragma", "GET / HTTP/1.1\r\nHost: o\r\nPragma: no-cache\r\n\r\n", headOK},
		{"connection close", "GET / HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n", headOK},
		{"content-length and transfer-encoding", "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", headBad},
		{"duplicate content-length", "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", headBad},
		{"content-length list", "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5, 5\r\n\r\n", headBad},
		{"signed content-length", "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: +5\r\n\r\n", headBad},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: o\r\nX-A: 1\r\n 2\r\n\r\n", headBad},
		{"bare LF", "GET / HTTP/1.1\nHost: o\r\n\r\n", headBad},
		{"bare CR", "GET / HTTP/1.1\r\nHost: o\rX: 1\r\n\r\n", headBad},
		{"chunked", "POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n", headFallback},
		{"expect", "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n", headFallback},
		{"upgrade", "GET / HTTP/1.1\r\nHost: o\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", headFallback},
		{"http/1.0", "GET / HTTP/1.0\r\nHost: o\r\n\r\n", headFallback},
		{"h2 preface", "PRI * HTTP/2.0\r\n\r\n", headFallback},
		{"connect", "CONNECT o:443 HTTP/1.1\r\nHost: o:443\r\n\r\n", headFallback},
		{"no host", "GET / HTTP/1.1\r\nX: 1\r\n\r\n", headFallback},
		{"two hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", headFallback},
		{"large body", "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 100000\r\n\r\n", headFallback},
		{"space before colon", "GET / HTTP/1.1\r\nHost : o\r\n\r\n", headFallback},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, got := parseRequestHead([]byte(tt.head), nil)
			if got != tt.want {
				t.Fatalf("verdict %d, want %d", got, tt.want)
			}
			checkAgainstNetHTTP(t, []byte(tt.head))
		})
	}
}

// FuzzParseRequestHead checks that whatever the fast path accepts, net/http
// reads the same way: method, target, Host, header, length, Close.
func FuzzParseRequestHead(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: o\r\n\r\n",
		"POST /x?y HTTP/1.1\r\nHost: o:1\r\nContent-Length: 3\r\nConnection: keep-alive, close\r\n\r\n",
		"GET http://a/b HTTP/1.1\r\nhost: c\r\nx-Y: 1\r\nX-y:  2 \r\n\r\n",
		"GET / HTTP/1.1\r\nHost: o\r\nPragma: no-cache\r\nCache-Control: max-age=0\r\n\r\n",
		"GET /%zz HTTP/1.1\r\nHost: o\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		i := bytes.Index(b, crlfcrlf)
		if i < 0 {
			return
		}
		checkAgainstNetHTTP(t, b[:i+4])
	})
}

// FuzzParseOriginForm: a target the fast parser takes parses as
// url.ParseRequestURI parses it, field by field.
func FuzzParseOriginForm(f *testing.F) {
	for _, s := range []string{"/", "/a/b;c=d", "/a?b=c&d", "/a?", "/a??", "/a?b?", "//x", "/a:b@c", "/%41", "/a b", "/a?b#c", "/a\"b", "/a?\x7f", "/~user/$x+,y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, target string) {
		var got url.URL
		if !parseOriginForm(target, &got) {
			return
		}
		want, err := url.ParseRequestURI(target)
		if err != nil {
			t.Fatalf("%q: fast parse took it, url refused it: %v", target, err)
		}
		if !reflect.DeepEqual(&got, want) {
			t.Fatalf("%q: %#v, url %#v", target, got, *want)
		}
	})
}

// TestH1ServerSmuggling sends smuggling vectors to a real outbound fast
// path: each gets a 400 and the connection is closed, and no request
// reaches the handler.
func TestH1ServerSmuggling(t *testing.T) {
	reached := make(chan string, 8)
	s, addr := startH1Server(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached <- r.URL.Path
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	defer s.shutdown(context.Background())
	for _, head := range []string{
		"POST /a HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"POST /b HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
		"GET /c HTTP/1.1\r\nHost: o\r\nX: 1\r\n\tfolded\r\n\r\n",
		"GET /d HTTP/1.1\nHost: o\n\n",
	} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, head); err != nil {
			t.Fatal(err)
		}
		all, _ := io.ReadAll(c)
		c.Close()
		if !strings.HasPrefix(string(all), "HTTP/1.1 400 ") {
			t.Errorf("%q: got %q, want a 400 and a closed connection", head, all)
		}
	}
	select {
	case p := <-reached:
		t.Fatalf("request %s reached the handler", p)
	default:
	}
}

// TestH1ServerResponses covers the fast path's framing against net/http's
// client: held-back bodies get a Content-Length, streamed ones are
// chunked with trailers, keep-alive carries several requests with bodies,
// and unusual requests (chunked uploads) go through the fallback server on
// the same connection.
func TestH1ServerResponses(t *testing.T) {
	big := strings.Repeat("y", 10<<10)
	s, addr := startH1Server(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		switch r.URL.Path {
		case "/small":
			_, _ = w.Write([]byte("hello " + string(body)))
		case "/big":
			w.Header().Set("Trailer", "X-Sum")
			_, _ = io.WriteString(w, big)
			w.(http.Flusher).Flush()
			w.Header().Set("X-Sum", "done")
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
		}
	}))
	defer s.shutdown(context.Background())
	c := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}
	for i := 0; i < 3; i++ {
		resp, err := c.Post("http://"+addr+"/small", "text/plain", strings.NewReader("world"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "hello world" || resp.ContentLength != 11 || resp.Header.Get("Content-Type") == "" || resp.Header.Get("Date") == "" {
			t.Fatalf("small: %q len %d header %v", b, resp.ContentLength, resp.Header)
		}
	}
	resp, err := c.Get("http://" + addr + "/big")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != big || resp.ContentLength != -1 || resp.Trailer.Get("X-Sum") != "done" {
		t.Fatalf("big: %d bytes, len %d, trailer %v", len(b), resp.ContentLength, resp.Trailer)
	}
	resp, err = c.Get("http://" + addr + "/empty")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("empty: %d", resp.StatusCode)
	}
	// A chunked upload: net/http's server answers it.
	req, _ := http.NewRequest("POST", "http://"+addr+"/small", io.MultiReader(strings.NewReader("chun"), strings.NewReader("ked")))
	req.ContentLength = -1
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "hello chunked" {
		t.Fatalf("chunked upload: %q", b)
	}
}

func startH1Server(t *testing.T, h http.Handler) (*h1Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fb := newConnListener(ln.Addr())
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(fb) }()
	s := newH1Server(h, fb, func(net.Conn) context.Context { return context.Background() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.serveConn(c)
		}
	}()
	t.Cleanup(func() { ln.Close(); srv.Close() })
	return s, ln.Addr().String()
}

// TestH1ServerShutdown: shutdown closes idle connections, lets a request
// in flight finish (its response says Connection: close) and returns when
// every connection is done.
func TestH1ServerShutdown(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	s, addr := startH1Server(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(entered)
			<-release
		}
		_, _ = io.WriteString(w, "ok")
	}))
	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	idle, idleR := dial()
	defer idle.Close()
	_, _ = io.WriteString(idle, "GET /fast HTTP/1.1\r\nHost: o\r\n\r\n")
	resp, err := http.ReadResponse(idleR, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	busy, busyR := dial()
	defer busy.Close()
	_, _ = io.WriteString(busy, "GET /slow HTTP/1.1\r\nHost: o\r\n\r\n")
	<-entered
	done := make(chan struct{})
	go func() { s.shutdown(context.Background()); close(done) }()
	for !s.closing.Load() {
		time.Sleep(time.Millisecond)
	}
	close(release)
	resp, err = http.ReadResponse(busyR, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "ok" || !resp.Close {
		t.Fatalf("in-flight request: %q, close %v; want ok and Connection: close", b, resp.Close)
	}
	<-done
	if n, err := idleR.ReadByte(); err == nil {
		t.Fatalf("idle connection still open (read %q)", n)
	}
}

// TestH1ServerRequestsAreTheirOwn: requests on one connection start from
// the connection's context, address and TLS state, and a handler that
// changes its request or keeps it changes nothing the next request sees.
func TestH1ServerRequestsAreTheirOwn(t *testing.T) {
	type key struct{}
	var kept []*http.Request
	var mu sync.Mutex
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		kept = append(kept, r)
		mu.Unlock()
		if r.Context().Value(key{}) != "conn" || r.RemoteAddr == "" {
			w.WriteHeader(http.StatusTeapot)
		}
		w.Header().Add("X-Path", r.URL.Path) // the pooled response's header is cleared between requests
		io.WriteString(w, r.URL.Path+" "+r.URL.RawQuery+" "+strings.Join(r.Header["X-A"], ","))
		r.Header.Set("X-A", "changed")
		r.URL.Path = "/changed"
		r.RemoteAddr = "changed"
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s := newH1Server(h, newConnListener(ln.Addr()), func(net.Conn) context.Context {
		return context.WithValue(context.Background(), key{}, "conn")
	})
	go func() {
		c, err := ln.Accept()
		if err == nil {
			s.serveConn(c)
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	for i, tc := range []struct{ head, want string }{
		{"GET /one?q=1 HTTP/1.1\r\nHost: o\r\nX-A: 1\r\nX-A: 2\r\n\r\n", "/one q=1 1,2"},
		{"GET /two HTTP/1.1\r\nHost: o\r\n\r\n", "/two  "},
		{"GET /th%72ee?x HTTP/1.1\r\nHost: o\r\nX-A: 3\r\n\r\n", "/three x 3"},
	} {
		if _, err := io.WriteString(c, tc.head); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != tc.want {
			t.Fatalf("request %d: %d %q, want 200 %q", i, resp.StatusCode, b, tc.want)
		}
		if p := resp.Header["X-Path"]; len(p) != 1 || !strings.HasPrefix(tc.want, p[0]+" ") {
			t.Fatalf("request %d: X-Path %q", i, p)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(kept) != 3 || kept[0] == kept[1] || kept[1].Context() != kept[2].Context() {
		t.Fatalf("requests: %d, distinct %v, same connection context %v", len(kept), kept[0] != kept[1], kept[1].Context() == kept[2].Context())
	}
}

// TestH1ServerOldBodyStaysClosed: a handler that keeps a request's body
// and reads it during the next request on the connection reads an error,
// never the next request's bytes.
func TestH1ServerOldBodyStaysClosed(t *testing.T) {
	var old io.Reader
	s, addr := startH1Server(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if old != nil {
			b := make([]byte, 64)
			n, err := old.Read(b)
			if n > 0 || err == nil {
				t.Errorf("the previous request's body read %q, %v", b[:n], err)
			}
		}
		old = r.Body
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	}))
	defer s.shutdown(context.Background())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	for _, body := range []string{"first", "second", "third!"} {
		// The body is written with its head: already buffered when the
		// handler runs.
		fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != body {
			t.Fatalf("got %q, want %q", b, body)
		}
	}
}
