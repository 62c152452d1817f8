package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/regotest"
)

// bodyRego decides on the body, as opa-envoy-plugin policies do, and
// hands what it saw to the app as headers, so a test can compare it with
// what writ-enforcer answers for the CheckRequest Envoy would send.
const bodyRego = `package envoy.authz

default allow := false

allow := {"allowed": true, "headers": seen} if ok

seen := {
	"x-seen-body": json.marshal(input.parsed_body),
	"x-seen-truncated": json.marshal(input.truncated_body),
	"x-seen-text": object.get(input.attributes.request.http, "body", "-"),
	"x-seen-raw": object.get(input.attributes.request.http, "rawBody", "-"),
	"x-seen-partial": object.get(input.attributes.request.http.headers, "x-envoy-auth-partial-body", "-"),
	"x-seen-size": json.marshal(object.get(input.attributes.request.http, "size", "-")),
}

ok if input.parsed_body.action == "read"

ok if input.parsed_body.action == ["read"]

ok if input.attributes.request.http.method == "GET"

ok if input.attributes.request.http.headers["x-let-in"] == "yes"

ok if {
	input.truncated_body
	input.attributes.request.http.headers["x-allow-truncated"] == "yes"
}
`

var seenHeaders = []string{"x-seen-body", "x-seen-truncated", "x-seen-text", "x-seen-raw", "x-seen-partial", "x-seen-size"}

// bodyApp records each request's body and the policy's x-seen headers.
type bodyApp struct {
	mu     sync.Mutex
	bodies [][]byte
	seen   []http.Header
}

func (a *bodyApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	a.bodies = append(a.bodies, b)
	a.seen = append(a.seen, r.Header.Clone())
	a.mu.Unlock()
	fmt.Fprintf(w, "got %d bytes", len(b))
}

func (a *bodyApp) last() ([]byte, http.Header, int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.bodies) == 0 {
		return nil, nil, 0
	}
	return a.bodies[len(a.bodies)-1], a.seen[len(a.seen)-1], len(a.bodies)
}

// meshClient is the client workload's sidecar talking to the inbound port
// directly over mTLS, so a test chooses the framing (Content-Length or
// chunked) and the protocol (HTTP/1.1 or HTTP/2) the inbound sees.
func meshClient(t *testing.T, ca *testCA, h2 bool) *http.Client {
	src := ca.source(t, "/ns/demo/sa/client")
	cfg := svidtls.ClientConfig(src, src, svidtls.AuthorizeMemberOf(td), clockwork.NewRealClock())
	tr := &http.Transport{TLSClientConfig: cfg}
	if h2 {
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetHTTP2(true)
		cfg.NextProtos = []string{"h2"}
	} else {
		cfg.NextProtos = []string{"http/1.1"}
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// chunked hides a reader's length, so the client sends it chunked.
type chunked struct{ r io.Reader }

func (c chunked) Read(p []byte) (int, error) { return c.r.Read(p) }

// envoyCheck is the CheckRequest Envoy's ext_authz filter sends for a
// request whose body it buffered with with_request_body: the headers
// (lower case, pseudo-headers), the first max_request_bytes of the body
// as body (raw_body with pack_as_bytes), x-envoy-auth-partial-body and as
// size the body bytes it received before the check (its bytesReceived:
// none without a body, and here the bytes it held).
func envoyCheck(method, ct string, body []byte, declared bool, rb RequestBody) *authv3.CheckRequest {
	h := map[string]string{":method": method, ":path": "/orders", ":authority": "server", ":scheme": "https"}
	if ct != "" {
		h["content-type"] = ct
	}
	if declared {
		h["content-length"] = strconv.Itoa(len(body))
	}
	hr := &authv3.AttributeContext_HttpRequest{Method: method, Path: "/orders", Host: "server", Scheme: "https", Protocol: "HTTP/1.1", Headers: h}
	if body != nil {
		part := body[:min(len(body), rb.MaxBytes)]
		hr.Size = int64(len(part))
		if rb.PackAsBytes {
			hr.RawBody = part
		} else {
			hr.Body = string(part)
		}
		h[enforcer.PartialBodyHeader] = strconv.FormatBool(len(part) < len(body))
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: "spiffe://example.org/ns/demo/sa/client"},
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://example.org/ns/demo/sa/server"},
		Request:     &authv3.AttributeContext_Request{Http: hr},
	}}
}

// extAuthz serves writ-enforcer's ext_authz gRPC API with the policy on a
// loopback port, the way Envoy reaches it, and returns a client.
func extAuthz(t *testing.T, rego string) authv3.AuthorizationClient {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	enforcer.NewServer(regotest.Enforcer(t, rego, &decisions{}), 5*time.Second).Register(g)
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	cc, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return authv3.NewAuthorizationClient(cc)
}

// TestRequestBodyToPolicy: with ext_authz's with_request_body the inbound
// sidecar holds the body for the check, a Rego policy decides on
// input.parsed_body, what it sees (parsed_body, truncated_body, the body
// text or bytes, the partial-body header) is what writ-enforcer sees for
// the CheckRequest Envoy sends for the same request, a body over the limit
// is refused with 413 (or checked by its first bytes with
// allow_partial_message), and the app gets every byte of the body.
func TestRequestBodyToPolicy(t *testing.T) {
	ca := newTestCA(t)
	authz := extAuthz(t, bodyRego)
	big := []byte(`{"action": "read", "pad": "` + strings.Repeat("x", 200<<10) + `"}`) // beyond the fast path's in-place limit
	long := []byte(`{"action": "read", "pad": "` + strings.Repeat("y", 100) + `"}`)
	strict := RequestBody{MaxBytes: 64}
	partial := RequestBody{MaxBytes: 64, AllowPartialMessage: true}
	raw := RequestBody{MaxBytes: 64, PackAsBytes: true}
	tests := []struct {
		name     string
		rb       RequestBody
		method   string
		ct       string
		body     []byte
		chunked  bool
		h2       bool
		header   map[string]string
		want     int
		seenBody string // parsed_body as the policy saw it, for an allowed request
	}{
		{"json allowed", strict, "POST", "application/json", []byte(`{"action": "read"}`), false, false, nil, 200, `{"action":"read"}`},
		{"json denied", strict, "POST", "application/json", []byte(`{"action": "delete"}`), false, false, nil, 403, ""},
		{"form allowed", strict, "POST", "application/x-www-form-urlencoded", []byte(`action=read&n=1`), false, false, nil, 200, `{"action":["read"],"n":["1"]}`},
		{"chunked json allowed", strict, "POST", "application/json", []byte(`{"action": "read"}`), true, false, nil, 200, `{"action":"read"}`},
		{"chunked json denied", strict, "POST", "application/json", []byte(`{"action": "write"}`), true, false, nil, 403, ""},
		{"http2 json allowed", strict, "POST", "application/json", []byte(`{"action": "read"}`), false, true, nil, 200, `{"action":"read"}`},
		{"exactly the limit", strict, "POST", "application/json", []byte(`{"action": "read", "pad": "` + strings.Repeat("z", 64-29) + `"}`), false, false, nil, 200, `{"action":"read","pad":"` + strings.Repeat("z", 64-29) + `"}`},
		{"chunked, exactly the limit", strict, "POST", "application/json", []byte(`{"action": "read", "pad": "` + strings.Repeat("z", 64-29) + `"}`), true, false, nil, 200, `{"action":"read","pad":"` + strings.Repeat("z", 64-29) + `"}`},
		{"no body", strict, "GET", "", nil, false, false, nil, 200, `null`},
		{"no body, forged partial header dropped", strict, "GET", "", nil, false, false, map[string]string{enforcer.PartialBodyHeader: "true"}, 200, `null`},
		{"forged partial header overwritten", strict, "POST", "application/json", []byte(`{"action": "read"}`), false, false, map[string]string{enforcer.PartialBodyHeader: "true"}, 200, `{"action":"read"}`},
		{"too large", strict, "POST", "application/json", long, false, false, nil, 413, ""},
		{"chunked too large", strict, "POST", "application/json", long, true, false, nil, 413, ""},
		{"http2 chunked too large", strict, "POST", "application/json", long, true, true, nil, 413, ""},
		{"truncated allowed", partial, "POST", "application/json", long, false, false, map[string]string{"x-allow-truncated": "yes"}, 200, `null`},
		{"truncated denied", partial, "POST", "application/json", long, false, false, nil, 403, ""},
		{"chunked truncated, large, allowed", partial, "POST", "application/json", big, true, false, map[string]string{"x-allow-truncated": "yes"}, 200, `null`},
		{"large truncated allowed", partial, "POST", "application/json", big, false, false, map[string]string{"x-allow-truncated": "yes"}, 200, `null`},
		{"partial, whole body", partial, "POST", "application/json", []byte(`{"action": "read"}`), false, false, nil, 200, `{"action":"read"}`},
		// Not asked for: nothing held, the policy sees no body, the app gets it.
		{"off", RequestBody{}, "POST", "application/json", big, false, false, map[string]string{"x-let-in": "yes"}, 200, `null`},
		{"off, forged partial header dropped", RequestBody{}, "POST", "application/json", long, false, false, map[string]string{"x-let-in": "yes", enforcer.PartialBodyHeader: "true"}, 200, `null`},
		{"off, chunked", RequestBody{}, "POST", "application/json", long, true, false, map[string]string{"x-let-in": "yes"}, 200, `null`},
		{"pack as bytes", raw, "POST", "application/json", []byte(`{"action": "read"}`), false, false, nil, 200, `{"action":"read"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app := &bodyApp{}
			dec := &decisions{}
			srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: serveApp(t, app), RequestBody: tt.rb}}},
				Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, bodyRego, dec)})
			var body io.Reader
			if tt.body != nil {
				body = bytes.NewReader(tt.body)
				if tt.chunked {
					body = chunked{body}
				}
			}
			req, err := http.NewRequest(tt.method, "https://"+srv.Addr("mesh")+"/orders", body)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = "server"
			if tt.ct != "" {
				req.Header.Set("Content-Type", tt.ct)
			}
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			resp, err := meshClient(t, ca, tt.h2).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			answer, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Fatalf("status %d %q, want %d", resp.StatusCode, answer, tt.want)
			}
			got, seen, n := app.last()
			if tt.want != 200 {
				if n != 0 {
					t.Errorf("the app was called for a refused request")
				}
				dec.mu.Lock()
				defer dec.mu.Unlock()
				if tt.want == 413 && len(dec.got) != 0 {
					t.Errorf("413 recorded decisions %+v; Envoy answers before any check", dec.got)
				}
				if tt.want == 413 && string(answer) != "Payload Too Large" {
					t.Errorf("413 body %q", answer)
				}
				return
			}
			if !bytes.Equal(got, tt.body) && !(len(got) == 0 && tt.body == nil) {
				t.Fatalf("app got %d bytes, want the %d sent (first diff at %d)", len(got), len(tt.body), firstDiff(got, tt.body))
			}
			if s := seen.Get("x-seen-body"); s != tt.seenBody {
				t.Errorf("policy saw parsed_body %s, want %s", s, tt.seenBody)
			}
			// What writ-enforcer decides behind Envoy for the same request.
			cr := envoyCheck(tt.method, tt.ct, tt.body, !tt.chunked && tt.body != nil, tt.rb)
			if tt.rb.MaxBytes == 0 {
				h := cr.Attributes.Request.Http
				h.Body, h.RawBody, h.Size = "", nil, 0
				delete(h.Headers, enforcer.PartialBodyHeader)
			}
			for k, v := range tt.header {
				if k != enforcer.PartialBodyHeader {
					cr.Attributes.Request.Http.Headers[k] = v
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			er, err := authz.Check(ctx, cr)
			if err != nil {
				t.Fatal(err)
			}
			want := http.Header{}
			for _, h := range er.GetOkResponse().GetHeaders() {
				want.Set(h.GetHeader().GetKey(), h.GetHeader().GetValue())
			}
			if er.GetOkResponse() == nil {
				t.Fatalf("writ-enforcer denied the Envoy CheckRequest: %v", er.GetDeniedResponse())
			}
			// What Envoy's with_request_body promises policy.
			held := tt.body[:min(len(tt.body), tt.rb.MaxBytes)]
			expect := map[string]string{"x-seen-truncated": strconv.FormatBool(len(tt.body) > tt.rb.MaxBytes),
				"x-seen-partial": "-", "x-seen-text": "-", "x-seen-raw": "-"}
			if tt.rb.MaxBytes == 0 {
				expect["x-seen-truncated"] = "false"
			} else if tt.body != nil {
				expect["x-seen-partial"] = strconv.FormatBool(len(tt.body) > tt.rb.MaxBytes)
				if tt.rb.PackAsBytes {
					expect["x-seen-raw"] = base64.StdEncoding.EncodeToString(held)
				} else {
					expect["x-seen-text"] = string(held)
				}
			}
			for k, v := range expect {
				if seen.Get(k) != v {
					t.Errorf("%s: policy saw %q, want %q", k, seen.Get(k), v)
				}
			}
			for _, k := range seenHeaders {
				if seen.Get(k) != want.Get(k) {
					t.Errorf("%s: policy in writ-proxy saw %q, behind Envoy %q", k, seen.Get(k), want.Get(k))
				}
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestRequestBodyThroughPair: app -> outbound sidecar -> inbound sidecar
// holding the body -> app. The policy decides on the body, a body over
// the limit comes back to the calling app as 413, and a partial check
// still delivers the whole body.
func TestRequestBodyThroughPair(t *testing.T) {
	ca := newTestCA(t)
	for _, rb := range []RequestBody{{MaxBytes: 1024}, {MaxBytes: 1024, AllowPartialMessage: true}} {
		t.Run(fmt.Sprintf("partial=%v", rb.AllowPartialMessage), func(t *testing.T) {
			app := &bodyApp{}
			srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: serveApp(t, app), RequestBody: rb}}},
				Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, bodyRego, &decisions{})})
			cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
			cfg.AddUpstream("server", "127.0.0.1:0")
			cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
			post := func(body []byte, chunk bool, hdr map[string]string) int {
				t.Helper()
				var r io.Reader = bytes.NewReader(body)
				if chunk {
					r = chunked{r}
				}
				req, _ := http.NewRequest("POST", "http://"+cli.Addr("upstream:server")+"/orders", r)
				req.Header.Set("Content-Type", "application/json")
				for k, v := range hdr {
					req.Header.Set(k, v)
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				return resp.StatusCode
			}
			for _, chunk := range []bool{false, true} {
				if code := post([]byte(`{"action": "read"}`), chunk, nil); code != 200 {
					t.Fatalf("chunked=%v: allowed body: %d", chunk, code)
				}
				if code := post([]byte(`{"action": "drop"}`), chunk, nil); code != 403 {
					t.Fatalf("chunked=%v: denied body: %d", chunk, code)
				}
				large := []byte(`{"action": "read", "pad": "` + strings.Repeat("q", 300<<10) + `"}`)
				code := post(large, chunk, map[string]string{"x-allow-truncated": "yes"})
				want := 413
				if rb.AllowPartialMessage {
					want = 200
				}
				if code != want {
					t.Fatalf("chunked=%v: large body: %d, want %d", chunk, code, want)
				}
				if got, seen, _ := app.last(); want == 200 && (!bytes.Equal(got, large) || seen.Get("x-seen-truncated") != "true") {
					t.Fatalf("chunked=%v: app got %d of %d bytes, policy saw truncated_body %q", chunk, len(got), len(large), seen.Get("x-seen-truncated"))
				}
			}
		})
	}
}

// stingyReader hands out a body a few bytes per read, as a slow client's
// chunks arrive.
type stingyReader struct {
	b     []byte
	reads int
}

func (s *stingyReader) Read(p []byte) (int, error) {
	if len(s.b) == 0 {
		return 0, io.EOF
	}
	s.reads++
	n := copy(p[:min(len(p), 7)], s.b)
	s.b = s.b[n:]
	return n, nil
}

func (s *stingyReader) Close() error { return nil }

// TestHoldBodyBounds: what holdBody keeps never exceeds max_request_bytes
// (nor the declared length), grows from a small first buffer for a body
// of unknown length, and the replayed body is the original.
func TestHoldBodyBounds(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789"), 20_000) // 200,000 bytes: beyond the first buffers
	tests := []struct {
		name        string
		declared    int64
		rb          RequestBody
		wantHeld    int
		wantPartial bool
		wantErr     error
	}{
		{"unknown length, partial", -1, RequestBody{MaxBytes: 100_000, AllowPartialMessage: true}, 100_000, true, nil},
		{"unknown length, whole", -1, RequestBody{MaxBytes: 1 << 20}, 200_000, false, nil},
		{"unknown length, too large", -1, RequestBody{MaxBytes: 199_999}, 0, false, errBodyTooLarge},
		{"unknown length, exactly the limit", -1, RequestBody{MaxBytes: 200_000}, 200_000, false, nil},
		{"declared, within", 200_000, RequestBody{MaxBytes: 1 << 20}, 200_000, false, nil},
		{"declared, partial", 200_000, RequestBody{MaxBytes: 50_000, AllowPartialMessage: true}, 50_000, true, nil},
		{"declared, exactly the limit", 200_000, RequestBody{MaxBytes: 200_000, AllowPartialMessage: true}, 200_000, false, nil},
		{"declared, too large", 200_000, RequestBody{MaxBytes: 50_000}, 0, false, errBodyTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := &stingyReader{b: body}
			r, _ := http.NewRequest("POST", "http://x/", nil)
			r.Body, r.ContentLength = src, tt.declared
			hb, err := holdBody(r, tt.rb, nil)
			if err != tt.wantErr {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if len(hb.buf) != tt.wantHeld || hb.partial != tt.wantPartial {
				t.Errorf("held %d partial %v, want %d %v", len(hb.buf), hb.partial, tt.wantHeld, tt.wantPartial)
			}
			// At most the limit and the declared length, and grown by
			// doubling as bytes arrive (from 4 KiB for an unknown length).
			limit := min(tt.rb.MaxBytes, max(firstBodyRead, 2*len(hb.buf)))
			if tt.declared > 0 {
				limit = min(tt.rb.MaxBytes, int(tt.declared))
			}
			if cap(hb.buf) > limit {
				t.Errorf("buffer of %d bytes, want at most %d", cap(hb.buf), limit)
			}
			got, err := io.ReadAll(r.Body)
			if err != nil || !bytes.Equal(got, body) {
				t.Errorf("replayed %d bytes (%v), want the %d sent", len(got), err, len(body))
			}
		})
	}
}

// TestPerRouteBodySettingsRefused: a route's own with_request_body (or
// disable_request_body_buffering) would be ignored by the proxy, which
// takes the filter's, so it is refused rather than silently dropped.
func TestPerRouteBodySettingsRefused(t *testing.T) {
	for name, cs := range map[string]*extauthzv3.CheckSettings{
		"with_request_body": {WithRequestBody: &extauthzv3.BufferSettings{MaxRequestBytes: 10}},
		"disable buffering": {DisableRequestBodyBuffering: true},
	} {
		a := mustAny(t, &extauthzv3.ExtAuthzPerRoute{Override: &extauthzv3.ExtAuthzPerRoute_CheckSettings{CheckSettings: cs}})
		if _, _, _, err := authzPerRoute(a); err == nil || !strings.Contains(err.Error(), "per-route request body") {
			t.Errorf("%s: got %v, want a refusal", name, err)
		}
	}
}

// BenchmarkProxyPairBody is BenchmarkProxyPair with 1 KiB JSON POSTs, the
// inbound's with_request_body off (every listener's default) and on
// (4 KiB: the body is held and parsed for policy).
func BenchmarkProxyPairBody(b *testing.B) {
	ca := newTestCA(b)
	sink := enforcer.SinkFunc(func(context.Context, enforcer.Decision) error { return nil })
	body := []byte(`{"action": "read", "pad": "` + strings.Repeat("p", 1024-29) + `"}`)
	for _, tt := range []struct {
		name string
		rb   RequestBody
	}{{"off", RequestBody{}}, {"held", RequestBody{MaxBytes: 4096}}} {
		b.Run(tt.name, func(b *testing.B) {
			srv := startProxy(b, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: serveApp(b, benchApp()), RequestBody: tt.rb}}},
				Options{Source: ca.source(b, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(b, allowClientRego, sink)})
			cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
			cfg.AddUpstream("server", "127.0.0.1:0")
			cli := startProxy(b, cfg, Options{Source: ca.source(b, "/ns/demo/sa/client")})
			c := &http.Client{Transport: &http.Transport{}}
			url := "http://" + cli.Addr("upstream:server") + "/orders"
			benchLoop(b, func() (*http.Response, error) { return c.Post(url, "application/json", bytes.NewReader(body)) })
		})
	}
}

// TestHeldBodyDeadline: a client that sends a body too slowly to be held
// (a slowloris) is answered 408 once bodyHoldTimeout passes, on the
// HTTP/1.1 fast path, net/http's HTTP/1.1 (chunked) and HTTP/2, with no
// decision and nothing sent to the app; and the deadline ends with the
// hold, so the rest of a partially checked body may follow later. Either
// way the held bytes go back to the proxy's budget.
func TestHeldBodyDeadline(t *testing.T) {
	defer func(d time.Duration) { bodyHoldTimeout = d }(bodyHoldTimeout)
	bodyHoldTimeout = 200 * time.Millisecond
	ca := newTestCA(t)
	for _, tt := range []struct {
		name          string
		h2, declared  bool
		rb            RequestBody
		pause, status int
	}{
		{"fast path, stalled", false, true, RequestBody{MaxBytes: 1 << 10}, -1, 408},
		{"chunked, stalled", false, false, RequestBody{MaxBytes: 1 << 10}, -1, 408},
		{"http2, stalled", true, false, RequestBody{MaxBytes: 1 << 10}, -1, 408},
		{"fast path, rest after the hold", false, true, RequestBody{MaxBytes: 16, AllowPartialMessage: true}, 3, 200},
		{"chunked, rest after the hold", false, false, RequestBody{MaxBytes: 16, AllowPartialMessage: true}, 3, 200},
		{"http2, rest after the hold", true, false, RequestBody{MaxBytes: 16, AllowPartialMessage: true}, 3, 200},
	} {
		t.Run(tt.name, func(t *testing.T) {
			app := &bodyApp{}
			dec := &decisions{}
			srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: serveApp(t, app), RequestBody: tt.rb}}},
				Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, bodyRego, dec)})
			body := []byte(`{"action": "read", "pad": "` + strings.Repeat("x", 100) + `"}`)
			pr, pw := io.Pipe()
			defer pw.Close()
			req, err := http.NewRequest("POST", "https://"+srv.Addr("mesh")+"/orders", pr)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = "server"
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("x-allow-truncated", "yes")
			if tt.declared {
				req.ContentLength = int64(len(body))
			}
			go func() {
				_, _ = pw.Write(body[:16])
				if tt.pause < 0 {
					return // never more: the proxy must give up
				}
				time.Sleep(time.Duration(tt.pause) * bodyHoldTimeout)
				_, _ = pw.Write(body[16:])
				pw.Close()
			}()
			resp, err := meshClient(t, ca, tt.h2).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			answer, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d %q, want %d", resp.StatusCode, answer, tt.status)
			}
			// However the hold ended, its bytes are given back.
			waitFor(t, "held bytes given back", func() bool { return srv.bodies.used.Load() == 0 })
			got, _, n := app.last()
			if tt.status == 200 {
				if !bytes.Equal(got, body) {
					t.Errorf("app got %q, want %q", got, body)
				}
				return
			}
			if n != 0 {
				t.Errorf("the app was called for a request whose body never came")
			}
			dec.mu.Lock()
			defer dec.mu.Unlock()
			if len(dec.got) != 0 {
				t.Errorf("recorded decisions %+v for a request never checked", dec.got)
			}
		})
	}
}

// TestRefusedBodyDrainBounded: a body refused before its check (413 for
// a declared length over max_request_bytes) keeps the hold's deadline, so
// a client that claims a huge length and then trickles or stops cannot
// hold the connection while the fast path drains what it declared.
func TestRefusedBodyDrainBounded(t *testing.T) {
	defer func(d time.Duration) { bodyHoldTimeout = d }(bodyHoldTimeout)
	bodyHoldTimeout = 200 * time.Millisecond
	ca := newTestCA(t)
	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: serveApp(t, &bodyApp{}), RequestBody: RequestBody{MaxBytes: 1 << 10}}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, bodyRego, &decisions{})})
	src := ca.source(t, "/ns/demo/sa/client")
	cfg := svidtls.ClientConfig(src, src, svidtls.AuthorizeMemberOf(td), clockwork.NewRealClock())
	cfg.NextProtos = []string{"http/1.1"}
	c, err := tls.Dial("tcp", srv.Addr("mesh"), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Declares a length the fast path takes (at most maxFastBody) over
	// the limit, and sends 16 bytes of it.
	if _, err := io.WriteString(c, "POST /orders HTTP/1.1\r\nHost: server\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{\"action\": \"rea"); err != nil {
		t.Fatal(err)
	}
	// The guard, far above bodyHoldTimeout, only ends a failing test.
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("status %d, want 413", resp.StatusCode)
	}
	if _, err := br.ReadByte(); errors.Is(err, os.ErrDeadlineExceeded) || err == nil {
		t.Fatalf("after the 413 the connection stays open (read: %v): the proxy waits for the declared body without a deadline", err)
	}
}
