package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// TestWriteRequestMatchesNetHTTP checks the fast request serializer
// against Request.Write byte for byte.
func TestWriteRequestMatchesNetHTTP(t *testing.T) {
	tests := []struct {
		name, method, url, body string
		header                  http.Header
		close                   bool
	}{
		{name: "get", method: "GET", url: "http://orders/a?b=c", header: http.Header{"X-B": {"2"}, "X-A": {"1", "3"}}},
		{name: "get no user agent", method: "GET", url: "http://orders:8080/", header: http.Header{"User-Agent": {""}}},
		{name: "post body", method: "POST", url: "http://orders/p", body: "hello", header: http.Header{"User-Agent": {" curl/8 "}, "Content-Type": {"text/plain"}}},
		{name: "post empty", method: "POST", url: "http://orders/p"},
		{name: "delete empty", method: "DELETE", url: "http://orders/d"},
		{name: "head", method: "HEAD", url: "http://orders/h"},
		{name: "close", method: "GET", url: "http://orders/c", close: true},
		{name: "escaped path", method: "GET", url: "http://orders/a%2Fb/%20c"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := http.NewRequest(tt.method, tt.url, nil)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tt.header {
				r.Header[k] = v
			}
			r.Close = tt.close
			var body []byte
			if tt.body != "" {
				body = []byte(tt.body)
				r.Body, r.ContentLength = io.NopCloser(strings.NewReader(tt.body)), int64(len(body))
			}
			var want bytes.Buffer
			if err := r.Write(&want); err != nil {
				t.Fatal(err)
			}
			var got bytes.Buffer
			bw := bufio.NewWriter(&got)
			if !writeRequest(bw, r, body) {
				t.Fatal("writeRequest refused a common request")
			}
			bw.Flush()
			if got.String() != want.String() {
				t.Fatalf("got\n%q\nwant\n%q", got.String(), want.String())
			}
		})
	}
}

// checkResponseAgainstNetHTTP fails when parseResponseHead accepts head
// and http.ReadResponse reads it differently or not at all.
func checkResponseAgainstNetHTTP(t *testing.T, head []byte) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://o/", nil)
	got := parseResponseHead(head, req)
	if got == nil {
		return
	}
	want, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(head)), req)
	if err != nil {
		t.Fatalf("fast path accepted %q, net/http refused it: %v", head, err)
	}
	if got.Status != want.Status || got.StatusCode != want.StatusCode || got.ContentLength != want.ContentLength || got.Close != want.Close ||
		!reflect.DeepEqual(map[string][]string(got.Header), map[string][]string(want.Header)) {
		t.Fatalf("%q:\ngot  %q %d len %d close %v %v\nwant %q %d len %d close %v %v", head,
			got.Status, got.StatusCode, got.ContentLength, got.Close, got.Header,
			want.Status, want.StatusCode, want.ContentLength, want.Close, want.Header)
	}
}

func TestParseResponseHead(t *testing.T) {
	for _, head := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
		"HTTP/1.1 503\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
		"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nPragma: no-cache\r\n\r\n",
		// More fields than h1Resp holds, and exactly as many.
		"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n" + strings.Repeat("X-A: 1\r\nX-B: 2\r\n", 6) + "\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\nF: 6\r\nG: 7\r\n\r\n",
	} {
		req, _ := http.NewRequest("GET", "http://o/", nil)
		if parseResponseHead([]byte(head), req) == nil {
			t.Errorf("%q: left to net/http", head)
		}
		checkResponseAgainstNetHTTP(t, []byte(head))
	}
	for _, head := range []string{
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
		"HTTP/1.1 200 OK\r\n\r\n",
		"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
		"HTTP/1.1 100 Continue\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
	} {
		req, _ := http.NewRequest("GET", "http://o/", nil)
		if parseResponseHead([]byte(head), req) != nil {
			t.Errorf("%q: taken by the fast path", head)
		}
	}
}

func FuzzParseResponseHead(f *testing.F) {
	f.Add([]byte("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 302\r\nLocation: /x\r\nContent-Length: 0\r\nConnection: keep-alive, close\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		i := bytes.Index(b, crlfcrlf)
		if i < 0 {
			return
		}
		checkResponseAgainstNetHTTP(t, b[:i+4])
	})
}
