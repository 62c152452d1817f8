package proxy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/regotest"
)

// The package tests mint SVIDs with a throwaway CA made here (a stand-in
// for the authority inside unit tests and benchmarks); test/proxy_*_test.go
// runs the same paths with SVIDs from a real authority and agent.
var td = spiffeid.RequireTrustDomainFromString("example.org")

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key}
}

// staticSource is a fixed SVID and bundle.
type staticSource struct {
	svid   *x509svid.SVID
	bundle *x509bundle.Bundle
}

func (s staticSource) GetX509SVID() (*x509svid.SVID, error) { return s.svid, nil }
func (s staticSource) GetX509BundleForTrustDomain(d spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.bundle.GetX509BundleForTrustDomain(d)
}

func (ca *testCA) source(t testing.TB, path string) staticSource {
	t.Helper()
	id := spiffeid.RequireFromPath(td, path)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return staticSource{
		svid:   &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key},
		bundle: x509bundle.FromX509Authorities(td, []*x509.Certificate{ca.cert}),
	}
}

const allowClientRego = `package envoy.authz

default allow := false

allow if {
	input.writ.source.service_account == "client"
	input.writ.destination_service == "server"
}
`

// decisions collects what the enforcer records.
type decisions struct {
	mu  sync.Mutex
	got []enforcer.Decision
}

func (d *decisions) Record(_ context.Context, dec enforcer.Decision) error {
	d.mu.Lock()
	d.got = append(d.got, dec)
	d.mu.Unlock()
	return nil
}

// startProxy runs p until the test ends.
func startProxy(t testing.TB, cfg *Config, opts Options) *Proxy {
	t.Helper()
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	p, err := New(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("proxy run: %v", err)
		}
	})
	return p
}

// pair is client app -> outbound proxy -> inbound proxy -> server app.
type pair struct {
	server, client *Proxy
	upstream       string // the client's local port for "server"
	seen           chan http.Header
}

func startPair(t testing.TB, ca *testCA, clientPath string, sink enforcer.Sink, app http.Handler) *pair {
	t.Helper()
	return startPairWith(t, ca, clientPath, sink, app, func(*Cluster) {})
}

// startPairWith is startPair with the client's cluster adjusted by edit.
func startPairWith(t testing.TB, ca *testCA, clientPath string, sink enforcer.Sink, app http.Handler, edit func(*Cluster)) *pair {
	t.Helper()
	return startPairOpts(t, ca, clientPath, sink, app, edit, Options{})
}

// startPairOpts is startPairWith with both proxies' WatchClientAfter
// and AccessLog taken from opts.
func startPairOpts(t testing.TB, ca *testCA, clientPath string, sink enforcer.Sink, app http.Handler, edit func(*Cluster), opts Options) *pair {
	t.Helper()
	if sink == nil {
		sink = &decisions{}
	}
	appAddr := serveApp(t, app)

	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appAddr}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, sink), WatchClientAfter: opts.WatchClientAfter, AccessLog: opts.AccessLog})
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	edit(&cfg.Clusters[0])
	cfg.AddUpstream("server", "127.0.0.1:0")
	cli := startProxy(t, cfg, Options{Source: ca.source(t, clientPath), WatchClientAfter: opts.WatchClientAfter, AccessLog: opts.AccessLog})
	return &pair{server: srv, client: cli, upstream: cli.Addr("upstream:server")}
}

// serveApp serves h on a loopback port until the test ends and returns
// its address.
func serveApp(t testing.TB, h http.Handler) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

func echoApp(seen chan<- http.Header) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if seen != nil {
			seen <- r.Header.Clone()
		}
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello "+r.URL.Path)
	})
}

func TestPairAllowDenyAndXFCC(t *testing.T) {
	ca := newTestCA(t)
	seen := make(chan http.Header, 10)
	dec := &decisions{}
	p := startPair(t, ca, "/ns/demo/sa/client", dec, echoApp(seen))

	req, _ := http.NewRequest("GET", "http://"+p.upstream+"/a", nil)
	req.Header.Set("X-Forwarded-Client-Cert", "URI=spiffe://example.org/ns/demo/sa/admin")
	req.Header.Set("X-Writ-Source", "forged")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "hello /a" {
		t.Fatalf("allowed client: got %d %q, want 200 %q", resp.StatusCode, body, "hello /a")
	}
	h := <-seen
	xfcc := h.Get("X-Forwarded-Client-Cert")
	if !strings.HasPrefix(xfcc, "By=spiffe://example.org/ns/demo/sa/server;Hash=") || !strings.HasSuffix(xfcc, ";URI=spiffe://example.org/ns/demo/sa/client") {
		t.Errorf("app saw XFCC %q, want By=server;Hash=...;URI=client", xfcc)
	}
	if len(h.Values("X-Forwarded-Client-Cert")) != 1 || h.Get("X-Writ-Source") != "" {
		t.Errorf("spoofed identity headers reached the app: %v", h)
	}
	if _, ok := validTraceparent(h.Get("Traceparent")); !ok {
		t.Errorf("app saw traceparent %q, want a valid one", h.Get("Traceparent"))
	}

	other := startPair(t, ca, "/ns/demo/sa/other", nil, echoApp(nil))
	resp, err = http.Get("http://" + other.upstream + "/a")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("denied client: got %d, want 403", resp.StatusCode)
	}
	dec.mu.Lock()
	defer dec.mu.Unlock()
	// Sidecars keep the app's protocol: HTTP/1.1 in, HTTP/1.1 between
	// them; h2c in, HTTP/2 between them.
	if len(dec.got) != 1 || dec.got[0].Result != enforcer.ResultAllow || dec.got[0].Source != "spiffe://example.org/ns/demo/sa/client" || dec.got[0].Protocol != "HTTP/1.1" {
		t.Fatalf("decisions: %+v", dec.got)
	}
	dec.mu.Unlock()
	h2c := &http.Transport{Protocols: new(http.Protocols)}
	h2c.Protocols.SetUnencryptedHTTP2(true)
	resp, err = (&http.Client{Transport: h2c}).Get("http://" + p.upstream + "/h2")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	<-seen
	dec.mu.Lock()
	if resp.StatusCode != 200 || len(dec.got) != 2 || dec.got[1].Protocol != "HTTP/2.0" {
		t.Fatalf("h2c from the app: %d, decisions %+v", resp.StatusCode, dec.got)
	}
}

// TestPairHTTP2Cluster: a cluster marked HTTP2 (an http2 or grpc service
// port) carries an HTTP/1.1 app's requests as HTTP/2 streams between the
// sidecars, all on one connection.
func TestPairHTTP2Cluster(t *testing.T) {
	ca := newTestCA(t)
	dec := &decisions{}
	p := startPairWith(t, ca, "/ns/demo/sa/client", dec, echoApp(nil), func(c *Cluster) { c.HTTP2 = true })
	for i := range 5 {
		resp, err := http.Get(fmt.Sprintf("http://%s/%d", p.upstream, i))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: %d", i, resp.StatusCode)
		}
	}
	dec.mu.Lock()
	defer dec.mu.Unlock()
	if len(dec.got) != 5 {
		t.Fatalf("decisions: %+v", dec.got)
	}
	for _, d := range dec.got {
		if d.Protocol != "HTTP/2.0" {
			t.Fatalf("between the sidecars: %s, want HTTP/2.0", d.Protocol)
		}
	}
}

// TestNoEnforcerDenies: an inbound listener without a policy denies.
func TestNoEnforcerDenies(t *testing.T) {
	ca := newTestCA(t)
	appL, _ := net.Listen("tcp", "127.0.0.1:0")
	go http.Serve(appL, echoApp(nil))
	defer appL.Close()
	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appL.Addr().String()}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server")})
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	resp, err := http.Post("http://"+cli.Addr("upstream:server")+"/", "text/plain", bytes.NewReader([]byte("x")))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("got %d, want 403", resp.StatusCode)
	}
}

// TestRetriesAndTimeouts: a failing endpoint's 503 is retried on the
// other one; a slow app hits the per-try timeout and then the request
// timeout (504).
func TestRetriesAndTimeouts(t *testing.T) {
	ca := newTestCA(t)
	release := make(chan struct{})
	defer close(release)
	good := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" || r.URL.Path == "/late/slow" {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		io.WriteString(w, "good")
	}))
	bad := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	peer := []string{"spiffe://example.org/ns/demo/sa/server"}
	cfg := &Config{
		Clusters: []Cluster{
			{Name: "server", Endpoints: []Endpoint{{Address: bad.server.Addr("mesh")}, {Address: good.server.Addr("mesh")}}, PeerIDs: peer},
			{Name: "slow", Endpoints: []Endpoint{{Address: good.server.Addr("mesh")}}, PeerIDs: peer},
		},
		Routes: []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{
			{Prefix: "/slow", Clusters: []WeightedCluster{{Name: "slow", Weight: 1}}, Timeout: Duration(300 * time.Millisecond),
				Retry: &RetryPolicy{RetryOn: []string{"5xx"}, NumRetries: 1, PerTryTimeout: Duration(100 * time.Millisecond), BaseInterval: Duration(time.Millisecond)}},
			{Prefix: "/late", Clusters: []WeightedCluster{{Name: "slow", Weight: 1}}, Timeout: Duration(200 * time.Millisecond)},
			{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}},
				Retry: &RetryPolicy{RetryOn: []string{"gateway-error"}, NumRetries: 1, BaseInterval: Duration(time.Millisecond)}},
		}}}}},
		Outbound: []Outbound{{Name: "out", Address: "127.0.0.1:0", Protocol: "http", Route: "r"}},
	}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	for i := range 6 {
		resp, err := http.Get("http://" + p.Addr("out") + "/x")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "good" {
			t.Fatalf("request %d: got %d %q, want the 503 retried onto the good endpoint", i, resp.StatusCode, b)
		}
	}
	// Both /slow tries hit the per-try timeout: 504.
	resp, err := http.Get("http://" + p.Addr("out") + "/slow")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("slow: got %d, want 504", resp.StatusCode)
	}
	// Without retries, on a pooled connection, the route's timeout is
	// the connection's deadline (routeCtx): 504 too; the client's
	// connection serves on, and so does the cluster.
	c := &http.Client{Transport: &http.Transport{}}
	for _, tc := range []struct {
		path string
		want int
	}{{"/late/ok", 200}, {"/late/slow", 504}, {"/late/ok", 200}, {"/late/ok", 200}, {"/late/slow", 504}, {"/x", 200}} {
		resp, err = c.Get("http://" + p.Addr("out") + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Fatalf("%s: got %d, want %d", tc.path, resp.StatusCode, tc.want)
		}
	}
}

// TestRetriedBodiesStayTheirOwn: request bodies kept for retry live in
// pooled buffers; every try of every request, on one keep-alive
// connection and on several at once, carries its own body and no other
// request's.
func TestRetriedBodiesStayTheirOwn(t *testing.T) {
	// Over HTTP/2 the transport sends a try's body from its own
	// goroutine and may close it after RoundTrip has returned.
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("http2=%v", h2), func(t *testing.T) { testRetriedBodies(t, h2) })
	}
}

func testRetriedBodies(t *testing.T, h2 bool) {
	ca := newTestCA(t)
	body := func(id string, n int) string {
		return strings.Repeat(id+".", n/(len(id)+1)+1)[:n]
	}
	check := func(w http.ResponseWriter, r *http.Request) (string, bool) {
		b, err := io.ReadAll(r.Body)
		n, _ := strconv.Atoi(r.Header.Get("X-Len"))
		if err != nil || string(b) != body(r.Header.Get("X-Id"), n) {
			w.WriteHeader(http.StatusTeapot)
			fmt.Fprintf(w, "got %d bytes %.40q", len(b), b)
			return "", false
		}
		return string(b), true
	}
	good := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if b, ok := check(w, r); ok {
			io.WriteString(w, b)
		}
	}))
	bad := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, ok := check(w, r); ok {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	peer := []string{"spiffe://example.org/ns/demo/sa/server"}
	cfg := &Config{
		// Room for every client to be retrying at once.
		Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: bad.server.Addr("mesh")}, {Address: good.server.Addr("mesh")}}, PeerIDs: peer,
			CircuitBreakers: &CircuitBreakers{MaxRequests: 1024, MaxRetries: 16}, HTTP2: h2}},
		Routes: []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{
			{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}},
				Retry: &RetryPolicy{RetryOn: []string{"gateway-error"}, NumRetries: 3, BaseInterval: Duration(time.Millisecond)}},
		}}}}},
		Outbound: []Outbound{{Name: "out", Address: "127.0.0.1:0", Protocol: "http", Route: "r"}},
	}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	sizes := []int{1, 17, 1024, smallBody - 1, smallBody, smallBody + 1, 20000}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for client := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Transport: &http.Transport{}}
			defer c.CloseIdleConnections()
			for i := range 30 {
				id, n := fmt.Sprintf("c%dr%d", client, i), sizes[(client+i)%len(sizes)]
				want := body(id, n)
				req, _ := http.NewRequest("POST", "http://"+p.Addr("out")+"/x", strings.NewReader(want))
				req.Header.Set("X-Id", id)
				req.Header.Set("X-Len", strconv.Itoa(n))
				resp, err := c.Do(req)
				if err != nil {
					errs <- err
					return
				}
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(got) != want {
					errs <- fmt.Errorf("%s (%d bytes): got %d, %d bytes %.60q", id, n, resp.StatusCode, len(got), got)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestFirstTryIsTheCallers: the forwarder hands roundTrip its outbound
// request with the allocation around it; the first try is sent as that
// request, and a retry as a copy of its own, so the first try's request
// is not changed once sent (its URL still names the endpoint it went
// to, its body is still its try's) for whoever may hold it.
func TestFirstTryIsTheCallers(t *testing.T) {
	ca := newTestCA(t)
	var badHits atomic.Int64
	bad := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		badHits.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	good := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	}))
	badAddr, goodAddr := bad.server.Addr("mesh"), good.server.Addr("mesh")
	cfg := &Config{
		Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: badAddr}, {Address: goodAddr}},
			PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}},
		Routes: []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{
			{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}},
				Retry: &RetryPolicy{RetryOn: []string{"gateway-error"}, NumRetries: 1, BaseInterval: Duration(time.Millisecond)}},
		}}}}},
		Outbound: []Outbound{{Name: "out", Address: "127.0.0.1:0", Protocol: "http", Route: "r"}},
	}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	st := p.state.Load()
	ctx := &targetCtx{Context: context.Background(), t: target{route: st.route("r", "server", "POST", "/x", nil), cluster: st.clusters["server"]}}
	var retried, direct int
	for i := range 6 {
		want := fmt.Sprintf("body %d", i)
		r, err := http.NewRequestWithContext(ctx, "POST", "https://server/x", strings.NewReader(want))
		if err != nil {
			t.Fatal(err)
		}
		first := &tryReq{fwdReq: fwdReq{req: *r, url: *r.URL}}
		out := &first.req
		out.URL = &first.url
		hits := badHits.Load()
		resp, err := roundTripper{p}.roundTrip(out, first)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(got) != want {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, got)
		}
		if badHits.Load() == hits {
			direct++
			if resp.Request != out || first.url.Host != goodAddr {
				t.Fatalf("request %d, one try: sent as %p to %s, want the caller's %p to %s", i, resp.Request, first.url.Host, out, goodAddr)
			}
			continue
		}
		retried++
		if resp.Request == out || resp.Request.URL == out.URL {
			t.Fatalf("request %d: the retry reused the first try's request", i)
		}
		if first.url.Host != badAddr || out.Body != &first.body {
			t.Fatalf("request %d: the first try's request changed after its try: to %s, body %T", i, first.url.Host, out.Body)
		}
	}
	if retried == 0 || direct == 0 {
		t.Fatalf("%d retried, %d direct: want both", retried, direct)
	}
}

// TestUpdateSwapsEndpoints: Update moves traffic to new endpoints, adds
// and removes listeners, and refuses what it cannot apply.
func TestUpdateSwapsEndpoints(t *testing.T) {
	ca := newTestCA(t)
	a := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "a") }))
	b := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "b") }))
	fetch := func() string {
		resp, err := http.Get("http://" + a.upstream + "/")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body)
	}
	if got := fetch(); got != "a" {
		t.Fatalf("before update: %q", got)
	}
	cfg := *a.client.Config()
	cfg.Clusters = []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: b.server.Addr("mesh")}}, PeerIDs: cfg.Clusters[0].PeerIDs}}
	if err := a.client.Update(&cfg); err != nil {
		t.Fatal(err)
	}
	if got := fetch(); got != "b" {
		t.Fatalf("after update: %q, want b", got)
	}
	// A new listener is bound and serves at once; the old ones keep
	// serving.
	cfg2 := cfg
	cfg2.Outbound = append([]Outbound{{Name: "new", Address: "127.0.0.1:0", Route: cfg.Outbound[0].Route}}, cfg.Outbound...)
	if err := a.client.Update(&cfg2); err != nil {
		t.Fatalf("adding a listener: %v", err)
	}
	newAddr := a.client.Addr("new")
	if newAddr == "" {
		t.Fatal("the added listener has no address")
	}
	resp, err := http.Get("http://" + newAddr + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "b" {
		t.Fatalf("through the added listener: %q", body)
	}
	if got := fetch(); got != "b" {
		t.Fatalf("the kept listener after adding one: %q", got)
	}
	// A listener that cannot be bound refuses the whole update.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg3 := cfg2
	cfg3.Outbound = append([]Outbound{{Name: "busy", Address: busy.Addr().String(), Route: cfg.Outbound[0].Route}}, cfg2.Outbound...)
	if err := a.client.Update(&cfg3); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("an update with an unbindable listener: %v", err)
	}
	if a.client.Addr("busy") != "" || a.client.Addr("new") != newAddr {
		t.Fatal("a refused update changed the listeners")
	}
	// Removing it stops it accepting.
	if err := a.client.Update(&cfg); err != nil {
		t.Fatalf("removing a listener: %v", err)
	}
	if a.client.Addr("new") != "" {
		t.Fatal("the removed listener is still listed")
	}
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", newAddr)
		if err != nil {
			break
		}
		c.Close()
		if i > 500 {
			t.Fatal("the removed listener still accepts")
		}
		time.Sleep(10 * time.Millisecond)
	}
	bad := cfg
	bad.Clusters = nil
	if err := a.client.Update(&bad); err == nil {
		t.Fatal("a configuration with a dangling route was accepted")
	}
	if got := fetch(); got != "b" {
		t.Fatalf("after refused updates: %q, want b", got)
	}
}

// TestExpiredSVID: once the injected clock passes the SVID's expiry the
// proxy is not ready and peers' handshakes fail, so no request reaches
// the app.
func TestExpiredSVID(t *testing.T) {
	ca := newTestCA(t)
	clock := clockwork.NewFakeClock()
	appL, _ := net.Listen("tcp", "127.0.0.1:0")
	go http.Serve(appL, echoApp(nil))
	defer appL.Close()
	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appL.Addr().String()}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, &decisions{}), Clock: clock})
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), Clock: clock})
	if err := srv.Ready(); err != nil {
		t.Fatalf("fresh SVID: %v", err)
	}
	clock.Advance(2 * time.Hour)
	if err := srv.Ready(); err == nil || !strings.Contains(err.Error(), "not valid") {
		t.Fatalf("expired SVID: Ready() = %v", err)
	}
	resp, err := http.Get("http://" + cli.Addr("upstream:server") + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("request with expired SVIDs: %d, want 503 (handshake refused)", resp.StatusCode)
	}
}

// TestOutlierDetection: an endpoint answering 503 is ejected after two in
// a row, traffic goes to the healthy one, and after the ejection time
// (on the injected clock) it is back in the pool.
func TestOutlierDetection(t *testing.T) {
	ca := newTestCA(t)
	clock := clockwork.NewFakeClock()
	good := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "good") }))
	bad := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	cfg := &Config{Clusters: []Cluster{{Name: "server",
		Endpoints:        []Endpoint{{Address: bad.server.Addr("mesh")}, {Address: good.server.Addr("mesh")}},
		PeerIDs:          []string{"spiffe://example.org/ns/demo/sa/server"},
		OutlierDetection: &OutlierDetection{Consecutive5xx: 2, BaseEjectionTime: Duration(30 * time.Second), MaxEjectionPercent: 50},
	}}}
	cfg.Routes = []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}}}}}}}
	cfg.Outbound = []Outbound{{Name: "out", Address: "127.0.0.1:0", Route: "r"}}
	reg := prometheus.NewRegistry()
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), Clock: clock, Registry: reg})
	status := func() int {
		resp, err := http.Get("http://" + p.Addr("out") + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	fails := 0
	for range 4 { // round robin: two of these land on the bad endpoint
		if status() == 503 {
			fails++
		}
	}
	if fails != 2 {
		t.Fatalf("%d of 4 requests failed before ejection, want 2", fails)
	}
	for i := range 10 {
		if s := status(); s != 200 {
			t.Fatalf("request %d after ejection: %d, want 200", i, s)
		}
	}
	clock.Advance(31 * time.Second)
	fails = 0
	for range 4 {
		if status() == 503 {
			fails++
		}
	}
	if fails == 0 {
		t.Fatal("the ejected endpoint never came back")
	}
	var m dto.Metric
	if err := p.metrics.ejections.WithLabelValues("server", detector5xx).Write(&m); err != nil || m.GetCounter().GetValue() < 1 {
		got := m.GetCounter().GetValue()
		t.Fatalf("writ_upstream_ejections_total = %v", got)
	}
}

// TestFaultsAndCircuitBreaker: an abort fault answers about its share of
// requests itself; a cluster at max_requests refuses the next with 503.
func TestFaultsAndCircuitBreaker(t *testing.T) {
	ca := newTestCA(t)
	release := make(chan struct{})
	arrived := make(chan struct{}, 1)
	srv := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			arrived <- struct{}{}
			<-release
		}
		io.WriteString(w, "ok")
	}))
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.server.Addr("mesh")}},
		PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}, CircuitBreakers: &CircuitBreakers{MaxRequests: 1}}}}
	cfg.Routes = []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{
		{Prefix: "/fault", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}, Fault: &Fault{AbortPercent: 25, AbortStatus: 503}},
		{Prefix: "/grpcfault", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}, Fault: &Fault{AbortPercent: 100, AbortGRPCStatus: 14}},
		{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}},
	}}}}}
	cfg.Outbound = []Outbound{{Name: "out", Address: "127.0.0.1:0", Route: "r"}}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	get := func(path string) int {
		resp, err := http.Get("http://" + p.Addr("out") + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	aborted := 0
	for range 400 {
		if get("/fault") == 503 {
			aborted++
		}
	}
	if aborted < 60 || aborted > 140 {
		t.Fatalf("25%% abort fault: %d of 400 aborted, want about 100", aborted)
	}
	// A gRPC abort is a trailers-only answer: 200 with grpc-status.
	resp, err := http.Get("http://" + p.Addr("out") + "/grpcfault")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Grpc-Status") != "14" || resp.Header.Get("Content-Type") != "application/grpc" {
		t.Fatalf("grpc abort fault: %d %v", resp.StatusCode, resp.Header)
	}
	done := make(chan int, 1)
	go func() { done <- get("/hold") }()
	<-arrived
	if s := get("/"); s != 503 {
		t.Fatalf("second request with max_requests 1: %d, want 503", s)
	}
	close(release)
	if s := <-done; s != 200 {
		t.Fatalf("held request: %d", s)
	}
	if s := get("/"); s != 200 {
		t.Fatalf("after the breaker closed: %d", s)
	}
}

// TestForeignTrustDomainRefused: a client whose SVID comes from another
// trust domain's CA fails the handshake; nothing reaches policy or app.
func TestForeignTrustDomainRefused(t *testing.T) {
	ca := newTestCA(t)
	dec := &decisions{}
	p := startPair(t, ca, "/ns/demo/sa/client", dec, echoApp(nil))
	foreign := newTestCA(t) // same trust domain name, different keys
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: p.server.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	intruder := startProxy(t, cfg, Options{Source: foreign.source(t, "/ns/demo/sa/client")})
	resp, err := http.Get("http://" + intruder.Addr("upstream:server") + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("client with a foreign SVID: %d, want 503 (handshake refused)", resp.StatusCode)
	}
	dec.mu.Lock()
	defer dec.mu.Unlock()
	if len(dec.got) != 0 {
		t.Fatalf("a foreign client reached policy: %+v", dec.got)
	}
}

// TestMirror: every request is copied to the shadow cluster (Host with
// "-shadow", same body); the shadow's slowness never delays the original.
func TestMirror(t *testing.T) {
	ca := newTestCA(t)
	type copyOf struct{ host, body string }
	shadowSaw := make(chan copyOf, 10)
	release := make(chan struct{})
	main := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "main") }))
	shadow := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		shadowSaw <- copyOf{r.Host, string(b)}
		<-release
		io.WriteString(w, "shadow")
	}))
	defer close(release)
	peer := []string{"spiffe://example.org/ns/demo/sa/server"}
	cfg := &Config{
		Clusters: []Cluster{
			{Name: "server", Endpoints: []Endpoint{{Address: main.server.Addr("mesh")}}, PeerIDs: peer},
			{Name: "shadow", Endpoints: []Endpoint{{Address: shadow.server.Addr("mesh")}}, PeerIDs: peer},
		},
		Routes: []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{
			{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}, Mirror: &Mirror{Cluster: "shadow", Percent: 100}},
		}}}}},
		Outbound: []Outbound{{Name: "out", Address: "127.0.0.1:0", Route: "r"}},
	}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	// post sends body through the mesh; the original must be answered
	// whatever happens to its copy.
	post := func(body io.Reader) {
		t.Helper()
		req, _ := http.NewRequest("POST", "http://"+p.Addr("out")+"/x", body)
		req.Host = "orders"
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "main" {
			t.Fatalf("original: %d %q", resp.StatusCode, b)
		}
	}
	saw := func() copyOf {
		t.Helper()
		select {
		case got := <-shadowSaw:
			return got
		case <-time.After(10 * time.Second):
			t.Fatal("no copy reached the shadow")
			return copyOf{}
		}
	}
	for i := range 3 {
		post(strings.NewReader(fmt.Sprint("body ", i)))
		if got := saw(); got.host != "orders-shadow" || got.body != fmt.Sprint("body ", i) {
			t.Fatalf("shadow saw %+v", got)
		}
	}
	// Bodies of unknown length (chunked here; gRPC calls alike: neither
	// reader below tells its size) are copied as they stream and mirrored
	// once they end within the bound. A larger one reaches the original
	// whole and is not mirrored.
	post(io.MultiReader(strings.NewReader("streamed body")))
	if got := saw(); got.host != "orders-shadow" || got.body != "streamed body" {
		t.Fatalf("shadow saw %+v for a streamed body", got)
	}
	post(io.MultiReader(strings.NewReader(strings.Repeat("x", maxRetryBody+1))))
	post(io.MultiReader(strings.NewReader("after the large one")))
	if got := saw(); got.body != "after the large one" {
		t.Fatalf("shadow saw %d bytes, want only the copy after the large body", len(got.body))
	}
	if n := testutil.ToFloat64(p.metrics.mirrors.WithLabelValues("shadow", "too_large")); n != 1 {
		t.Fatalf("too_large mirrors counted %v, want 1", n)
	}
}

// TestHashSource: a ring-hash cluster keyed by the source address sends
// every request of one client address to one endpoint, and different
// addresses over the endpoints.
func TestHashSource(t *testing.T) {
	ca := newTestCA(t)
	var eps []Endpoint
	for i := range 3 {
		name := fmt.Sprint("ep", i)
		b := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, name) }))
		eps = append(eps, Endpoint{Address: b.server.Addr("mesh")})
	}
	cfg := &Config{
		Clusters: []Cluster{{Name: "server", LBPolicy: RingHash, Endpoints: eps, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}},
		Routes: []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{
			{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}, HashSource: true},
		}}}}},
		Outbound: []Outbound{{Name: "out", Address: "127.0.0.1:0", Route: "r"}},
	}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client")})
	used := map[string]bool{}
	for src := 1; src <= 16; src++ {
		// A client per source address, without keep-alive, so that each
		// request is a new connection from that address.
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: (&net.Dialer{
			LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(src))},
		}).DialContext}}
		first := ""
		for range 4 {
			resp, err := c.Get("http://" + p.Addr("out") + "/")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("from 127.0.0.%d: %d %q", src, resp.StatusCode, b)
			}
			if first == "" {
				first = string(b)
			} else if string(b) != first {
				t.Fatalf("from 127.0.0.%d: answered by %s after %s; one source must stick to one endpoint", src, b, first)
			}
		}
		used[first] = true
	}
	// 16 addresses all on one of three endpoints: odds about 1e-7.
	if len(used) < 2 {
		t.Fatalf("16 source addresses all went to %v", used)
	}
}

// TestActiveHealthCheck: an endpoint that stops accepting leaves the pool
// at the next check (on the injected clock) and comes back by itself once
// a sidecar serves there again.
func TestActiveHealthCheck(t *testing.T) {
	ca := newTestCA(t)
	clock := clockwork.NewFakeClock()
	good := startPair(t, ca, "/ns/demo/sa/client", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "good") }))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	downAddr := l.Addr().String()
	l.Close()
	cfg := &Config{Clusters: []Cluster{{Name: "server",
		Endpoints:   []Endpoint{{Address: downAddr}, {Address: good.server.Addr("mesh")}},
		PeerIDs:     []string{"spiffe://example.org/ns/demo/sa/server"},
		HealthCheck: &HealthCheck{Interval: Duration(5 * time.Second), Timeout: Duration(time.Second), UnhealthyThreshold: 1, HealthyThreshold: 1},
	}}}
	cfg.Routes = []RouteConfig{{Name: "r", VirtualHosts: []VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []Route{{Prefix: "/", Clusters: []WeightedCluster{{Name: "server", Weight: 1}}}}}}}}
	cfg.Outbound = []Outbound{{Name: "out", Address: "127.0.0.1:0", Route: "r"}}
	p := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), Clock: clock})
	down := p.state.Load().clusters["server"].eps[0]
	// waitFor advances the clock a check interval at a time until cond.
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for i := 0; !cond(); i++ {
			if i > 2000 {
				t.Fatalf("%s never happened", what)
			}
			if i%50 == 0 {
				clock.Advance(5 * time.Second)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	waitFor("the dead endpoint leaving the pool", down.unhealthy.Load)
	for i := range 6 {
		resp, err := http.Get("http://" + p.Addr("out") + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d with the dead endpoint out of the pool: %d", i, resp.StatusCode)
		}
	}
	// A sidecar starts serving at the dead address: the endpoint returns.
	appL, _ := net.Listen("tcp", "127.0.0.1:0")
	go http.Serve(appL, echoApp(nil))
	defer appL.Close()
	startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: downAddr, Service: "server", App: appL.Addr().String()}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, &decisions{})})
	waitFor("the endpoint rejoining the pool", func() bool { return !down.unhealthy.Load() })
}

// TestNewFailureLeavesRegistry: a proxy that cannot bind its listeners
// leaves the metrics registry as it found it, so that the next attempt
// (the xDS client's next configuration) can start on the same registry.
func TestNewFailureLeavesRegistry(t *testing.T) {
	ca := newTestCA(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	cfg := &Config{Inbound: []Inbound{{Name: "mesh", Address: taken.Addr().String(), Service: "server", App: "127.0.0.1:1"}}}
	opts := Options{Source: ca.source(t, "/ns/demo/sa/server"), Registry: reg}
	if _, err := New(cfg, opts); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("New on a taken port: %v", err)
	}
	addr := taken.Addr().String()
	taken.Close()
	cfg.Inbound[0].Address = addr
	p, err := New(cfg, opts)
	if err != nil {
		t.Fatalf("New after a failed New on the same registry: %v", err)
	}
	p.Close()
}
