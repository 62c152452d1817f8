package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
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
