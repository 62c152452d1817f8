package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestHopByHopOnBothServers: the fast forwarding path edits the inbound
// request's header in place. Requests served by net/http's server (a head
// over h1HeadMax is handed to it) must leave the proxy exactly as those
// the proxy's own HTTP/1.1 server parses: hop-by-hop fields and the
// client's forwarding headers gone, Te: trailers kept, on every request
// of a kept-alive client connection and on every retry of one.
func TestHopByHopOnBothServers(t *testing.T) {
	ca := newTestCA(t)
	type try struct {
		path string
		h    http.Header
	}
	var mu sync.Mutex
	var tries []try
	failed := map[string]bool{}
	app := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		tries = append(tries, try{r.URL.Path, r.Header.Clone()})
		first := !failed[r.URL.Path]
		failed[r.URL.Path] = true
		mu.Unlock()
		if first {
			// Every request's first try fails: the route retries it.
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok "+r.URL.Path)
	})
	srv := startPair(t, ca, "/ns/demo/sa/client", nil, app)
	cfg := &Config{
		Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.server.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}},
		Routes: []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{
			{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}},
				Retry: &RetryPolicy{RetryOn: []string{"5xx"}, NumRetries: 2, BaseInterval: Duration(time.Millisecond)}},
		}}}}},
		Outbound: []Outbound{{Name: "out", Address: "127.0.0.1:0", Protocol: "http", Route: "r"}},
	}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})

	for _, big := range []bool{false, true} {
		name := "h1Server"
		if big {
			name = "net/http"
		}
		t.Run(name, func(t *testing.T) {
			c, err := net.Dial("tcp", p.Addr("out"))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			br := bufio.NewReader(c)
			pad := ""
			if big {
				// Past h1HeadMax: the fast server hands the connection
				// to net/http's, which then serves all of it.
				pad = "X-Pad: " + strings.Repeat("p", h1HeadMax) + "\r\n"
			}
			const n = 4
			for i := range n {
				path := fmt.Sprintf("/%s/%d", strings.ReplaceAll(name, "/", ""), i)
				body := "hello"
				fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: server\r\nConnection: keep-alive, X-Foo\r\nX-Foo: drop\r\nKeep-Alive: timeout=5\r\n"+
					"Te: trailers\r\nX-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Host: evil\r\nForwarded: for=10.9.9.9\r\nProxy-Connection: x\r\n"+
					"X-Keep: %d\r\n%sContent-Length: %d\r\n\r\n%s", path, i, pad, len(body), body)
				res, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("request %d on the kept-alive connection: %v", i, err)
				}
				b, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if res.StatusCode != 200 || string(b) != "ok "+path {
					t.Fatalf("request %d: %d %q", i, res.StatusCode, b)
				}
				if res.Close {
					t.Fatalf("request %d: the proxy closes the client connection", i)
				}
				mu.Lock()
				var got []try
				for _, tr := range tries {
					if tr.path == path {
						got = append(got, tr)
					}
				}
				mu.Unlock()
				if len(got) != 2 {
					t.Fatalf("request %d: the app saw %d tries, want 2 (one retry)", i, len(got))
				}
				for j, tr := range got {
					h := tr.h
					for _, k := range []string{"Connection", "X-Foo", "Keep-Alive", "Proxy-Connection", "Forwarded", "X-Forwarded-Host"} {
						if v, ok := h[k]; ok {
							t.Errorf("request %d try %d: hop-by-hop or client forwarding header %s: %q reached the app", i, j, k, v)
						}
					}
					if v := h.Values("X-Forwarded-For"); len(v) > 0 && strings.Contains(strings.Join(v, ","), "10.9.9.9") {
						t.Errorf("request %d try %d: the client's X-Forwarded-For reached the app: %q", i, j, v)
					}
					if v := h.Values("Te"); len(v) != 1 || v[0] != "trailers" {
						t.Errorf("request %d try %d: Te %q, want [trailers]", i, j, v)
					}
					if h.Get("X-Keep") != fmt.Sprint(i) || (big && h.Get("X-Pad") == "") {
						t.Errorf("request %d try %d: end-to-end headers lost: %v", i, j, h)
					}
				}
			}
		})
	}
}
