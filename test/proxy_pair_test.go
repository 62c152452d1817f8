package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/regotest"
	"github.com/writmesh/writ/internal/syncbuf"
	"github.com/writmesh/writ/proxy"
)

var (
	meshServerID = spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/orders")
	meshClientID = spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/frontend")
	meshOtherID  = spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/payments")
)

// meshPolicy allows frontend to call orders (HTTP and TCP) and nothing
// else.
const meshPolicy = `package envoy.authz

default allow := false

allow if {
	input.writ.source.service_account == "frontend"
	input.writ.destination_service == "orders"
}
`

// meshEnv is a real authority, a real node agent serving the Workload API,
// and SVID sources for three workloads fetched with go-spiffe's client.
type meshEnv struct {
	env     *authoritytest.Env
	sources map[spiffeid.ID]*workloadapi.X509Source
}

func startMesh(t *testing.T) *meshEnv {
	t.Helper()
	env := authoritytest.Start(t, authoritytest.Options{})
	ctx := context.Background()
	uid := fmt.Sprint(os.Geteuid())
	ids := []spiffeid.ID{meshServerID, meshClientID, meshOtherID}
	for _, id := range ids {
		if _, err := env.Registry.CreateEntry(ctx, authority.EntryInput{SPIFFEID: id.String(), ParentID: "spiffe://example.org/node/mesh",
			Selectors: []string{"unix:uid:" + uid}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	addr := startAgent(t, env, "mesh")
	m := &meshEnv{env: env, sources: map[spiffeid.ID]*workloadapi.X509Source{}}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, id := range ids {
		src, err := workloadapi.NewX509Source(sctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)), pick(id))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { src.Close() })
		if s, _ := src.GetX509SVID(); s.ID != id {
			t.Fatalf("source for %s serves %s", id, s.ID)
		}
		m.sources[id] = src
	}
	return m
}

// decisionLog is the audit sink of these tests: it keeps every decision.
type decisionLog struct {
	mu  sync.Mutex
	got []enforcer.Decision
}

func (d *decisionLog) Record(_ context.Context, dec enforcer.Decision) error {
	d.mu.Lock()
	d.got = append(d.got, dec)
	d.mu.Unlock()
	return nil
}

func (d *decisionLog) all() []enforcer.Decision {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]enforcer.Decision(nil), d.got...)
}

func (d *decisionLog) results() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for _, x := range d.got {
		out = append(out, x.Source+" "+x.Result)
	}
	return out
}

// runProxy runs a proxy until stop is called or the test ends; stop
// returns Run's error.
func runProxy(t *testing.T, cfg *proxy.Config, opts proxy.Options) (*proxy.Proxy, func() error) {
	t.Helper()
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	p, err := proxy.New(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() { cancel(); runErr = <-done })
		return runErr
	}
	t.Cleanup(func() { _ = stop() })
	return p, stop
}

func serveHTTP(t *testing.T, h http.Handler) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// serverSide is the orders workload: its app (HTTP on one port, gRPC on
// another, a TCP echo on a third) behind three inbound listeners of one
// proxy.
type serverSide struct {
	proxy    *proxy.Proxy
	stop     func() error
	seen     chan http.Header
	release  chan struct{}
	sink     *decisionLog
	registry string // admin URL
	// accessLog holds the inbound proxy's access log.
	accessLog *syncbuf.Buffer
}

func startServerSide(t *testing.T, m *meshEnv) *serverSide {
	t.Helper()
	s := &serverSide{seen: make(chan http.Header, 100), release: make(chan struct{}), sink: &decisionLog{}}
	httpApp := serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := r.Header.Clone()
		h.Set("Test-Path", r.URL.Path)
		select {
		case s.seen <- h:
		default:
		}
		if r.URL.Path == "/slow" {
			<-s.release
		}
		fmt.Fprintf(w, "orders %s %s", r.Proto, r.URL.Path)
	}))
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	go gs.Serve(gl)
	t.Cleanup(gs.Stop)
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tl.Close() })
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					fmt.Fprintf(c, "echo %s\n", sc.Text())
				}
			}()
		}
	}()
	cfg := &proxy.Config{Inbound: []proxy.Inbound{
		{Name: "http", Address: "127.0.0.1:0", Service: "orders", App: httpApp},
		{Name: "grpc", Address: "127.0.0.1:0", Service: "orders", App: gl.Addr().String(), AppProtocol: "h2c"},
		{Name: "tcp", Address: "127.0.0.1:0", Service: "orders", App: tl.Addr().String()},
	}}
	s.accessLog = &syncbuf.Buffer{}
	p, stop := runProxy(t, cfg, proxy.Options{Source: m.sources[meshServerID], Enforcer: regotest.Enforcer(t, meshPolicy, s.sink), DrainTimeout: 20 * time.Second, AccessLog: s.accessLog})
	s.proxy, s.stop = p, stop
	admin := httptest.NewServer(p.AdminHandler(nil))
	t.Cleanup(admin.Close)
	s.registry = admin.URL
	return s
}

// clientSide is a workload's outbound proxy with upstream ports to the
// orders listeners, and an HTTP proxy port.
func startClientSide(t *testing.T, m *meshEnv, id spiffeid.ID, s *serverSide, extraHTTPEndpoints ...string) (*proxy.Proxy, string) {
	t.Helper()
	peer := []string{meshServerID.String()}
	httpEPs := []proxy.Endpoint{}
	for _, a := range extraHTTPEndpoints {
		httpEPs = append(httpEPs, proxy.Endpoint{Address: a})
	}
	httpEPs = append(httpEPs, proxy.Endpoint{Address: s.proxy.Addr("http")})
	cfg := &proxy.Config{
		Clusters: []proxy.Cluster{
			{Name: "orders", Endpoints: httpEPs, PeerIDs: peer},
			{Name: "orders-grpc", Endpoints: []proxy.Endpoint{{Address: s.proxy.Addr("grpc")}}, PeerIDs: peer, LBPolicy: proxy.LeastRequest},
			{Name: "orders-tcp", Endpoints: []proxy.Endpoint{{Address: s.proxy.Addr("tcp")}}, PeerIDs: peer},
		},
		Routes: []proxy.RouteConfig{{Name: "orders", VirtualHosts: []proxy.VirtualHost{{Name: "orders", Domains: []string{"*"}, Routes: []proxy.Route{{
			Prefix: "/", Clusters: []proxy.WeightedCluster{{Name: "orders", Weight: 1}},
			Retry: &proxy.RetryPolicy{RetryOn: []string{"connect-failure", "gateway-error"}, NumRetries: 2, BaseInterval: proxy.Duration(time.Millisecond)},
		}}}}}},
		Outbound: []proxy.Outbound{
			{Name: "orders", Address: "127.0.0.1:0", Protocol: "http", Route: "orders"},
			{Name: "orders-tcp", Address: "127.0.0.1:0", Protocol: "tcp", Cluster: "orders-tcp"},
		},
	}
	cfg.AddUpstream("orders-grpc", "127.0.0.1:0")
	cfg.AddHTTPProxy("127.0.0.1:0")
	p, _ := runProxy(t, cfg, proxy.Options{Source: m.sources[id]})
	admin := httptest.NewServer(p.AdminHandler(nil))
	t.Cleanup(admin.Close)
	return p, admin.URL
}

func get(t *testing.T, c *http.Client, url string, hdr map[string]string) (int, string, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Proto
}

// TestProxyPair drives client -> writ-proxy (outbound) -> writ-proxy
// (inbound) -> app with SVIDs from a real authority and agent, and a Rego
// policy that allows frontend and denies payments.
func TestProxyPair(t *testing.T) {
	m := startMesh(t)
	s := startServerSide(t, m)
	// The frontend's orders cluster lists a dead endpoint first: every
	// request that lands there is retried on the live one.
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	front, frontAdmin := startClientSide(t, m, meshClientID, s, deadAddr)
	other, _ := startClientSide(t, m, meshOtherID, s)
	h1 := &http.Client{Transport: &http.Transport{}}

	t.Run("allow, XFCC, spoofed identity stripped", func(t *testing.T) {
		for range 4 {
			code, body, _ := get(t, h1, "http://"+front.Addr("orders")+"/items", map[string]string{
				"X-Forwarded-Client-Cert": "URI=spiffe://example.org/ns/shop/sa/admin",
				"X-Writ-Authz":            "allow",
			})
			if code != 200 || body != "orders HTTP/1.1 /items" {
				t.Fatalf("frontend: got %d %q, want 200", code, body)
			}
			h := <-s.seen
			xfcc := h.Values("X-Forwarded-Client-Cert")
			if len(xfcc) != 1 || !strings.HasPrefix(xfcc[0], "By="+meshServerID.String()+";Hash=") || !strings.HasSuffix(xfcc[0], ";URI="+meshClientID.String()) {
				t.Errorf("app saw XFCC %q, want one By=orders;Hash=…;URI=frontend", xfcc)
			}
			if h.Get("X-Writ-Authz") != "" {
				t.Errorf("spoofed x-writ header reached the app")
			}
		}
	})
	t.Run("traceparent and access log", func(t *testing.T) {
		const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
		code, _, _ := get(t, h1, "http://"+front.Addr("orders")+"/traced", map[string]string{"traceparent": tp})
		if code != 200 {
			t.Fatalf("got %d", code)
		}
		h := <-s.seen
		got := h.Get("Traceparent")
		if !strings.HasPrefix(got, tp[:36]) || got == tp {
			t.Fatalf("app saw traceparent %q, want trace 4bf9… with the outbound hop's new span", got)
		}
		// The access log is flushed every 200 ms.
		var line string
		for i := 0; line == "" && i < 500; i++ {
			for _, l := range strings.Split(s.accessLog.String(), "\n") {
				if strings.Contains(l, `"path":"/traced"`) {
					line = l
				}
			}
			if line == "" {
				time.Sleep(10 * time.Millisecond)
			}
		}
		var entry struct {
			Direction, Authz, Source string
			DecisionID               string `json:"decision_id"`
			TraceID                  string `json:"trace_id"`
			Status                   int
		}
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Fatalf("access log line %q: %v", line, err)
		}
		if entry.Direction != "inbound" || entry.Authz != "allow" || entry.Status != 200 || entry.Source != meshClientID.String() ||
			entry.TraceID != "4bf92f3577b34da6a3ce929d0e0e4736" || len(entry.DecisionID) != 36 {
			t.Fatalf("access log entry %+v", entry)
		}
		found := false
		for _, d := range s.sink.all() {
			found = found || (d.ID == entry.DecisionID && d.TraceID == entry.TraceID)
		}
		if !found {
			t.Fatalf("no recorded decision %s with trace %s", entry.DecisionID, entry.TraceID)
		}
	})
	t.Run("deny", func(t *testing.T) {
		code, _, _ := get(t, h1, "http://"+other.Addr("orders")+"/items", nil)
		if code != http.StatusForbidden {
			t.Fatalf("payments: got %d, want 403", code)
		}
		if got := s.sink.results(); !containsStr(got, meshOtherID.String()+" deny") || !containsStr(got, meshClientID.String()+" allow") {
			t.Fatalf("decisions: %v", got)
		}
	})
	t.Run("http proxy port", func(t *testing.T) {
		c := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(mustURL("http://" + front.Addr("http_proxy")))}}
		code, body, _ := get(t, c, "http://orders/via-proxy", nil)
		if code != 200 || body != "orders HTTP/1.1 /via-proxy" {
			t.Fatalf("got %d %q", code, body)
		}
	})
	t.Run("h2c from the app", func(t *testing.T) {
		tr := &http.Transport{}
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
		code, body, proto := get(t, &http.Client{Transport: tr}, "http://"+front.Addr("orders")+"/h2", nil)
		if code != 200 || proto != "HTTP/2.0" || !strings.HasSuffix(body, "/h2") {
			t.Fatalf("got %d %s %q", code, proto, body)
		}
	})
	t.Run("grpc", func(t *testing.T) {
		conn, err := grpc.NewClient(front.Addr("upstream:orders-grpc"), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "orders"})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("grpc health check through the pair: %v %v", resp, err)
		}
		// A server stream passes through unbuffered: Watch's first
		// message arrives while the stream stays open.
		wctx, wcancel := context.WithCancel(ctx)
		stream, err := healthpb.NewHealthClient(conn).Watch(wctx, &healthpb.HealthCheckRequest{Service: "orders"})
		if err != nil {
			t.Fatal(err)
		}
		if msg, err := stream.Recv(); err != nil || msg.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("grpc server stream through the pair: %v %v", msg, err)
		}
		wcancel()
		// An unknown service is the app's NotFound, carried back in
		// trailers.
		_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "nope"})
		if err == nil || !strings.Contains(err.Error(), "NotFound") {
			t.Fatalf("grpc error status through the pair: %v", err)
		}
	})
	t.Run("tcp", func(t *testing.T) {
		c, err := net.DialTimeout("tcp", front.Addr("orders-tcp"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "ping\n")
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "echo ping\n" {
			t.Fatalf("tcp through the pair: %q %v", line, err)
		}
		// The denied workload's connection is closed without a byte.
		d, err := net.DialTimeout("tcp", other.Addr("orders-tcp"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		_ = d.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(d, "ping\n")
		if b, err := io.ReadAll(d); len(b) != 0 {
			t.Fatalf("denied tcp connection got %q (%v)", b, err)
		}
		// Bytes are counted when a connection ends.
		c.Close()
		for i := 0; sumCounter(scrape(t, s.registry+"/metrics")["writ_tcp_sent_bytes_total"]) < 5; i++ {
			if i > 1000 {
				t.Fatal("the allowed tcp connection's bytes were never counted")
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	t.Run("metrics", func(t *testing.T) {
		fams := scrape(t, s.registry+"/metrics")
		want := map[string]bool{}
		for _, mt := range fams["writ_requests_total"].GetMetric() {
			l := map[string]string{}
			for _, lp := range mt.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			key := l["direction"] + " " + l["source_namespace"] + "/" + l["source_workload"] + " -> " + l["destination_service"] + " " + l["response_code"] + " " + l["authz_result"]
			want[key] = mt.GetCounter().GetValue() > 0
		}
		for _, k := range []string{"inbound shop/frontend -> orders 200 allow", "inbound shop/payments -> orders 403 deny"} {
			if !want[k] {
				t.Errorf("no writ_requests_total series %q in %v", k, want)
			}
		}
		if fams["writ_request_duration_seconds"].GetType().String() != "HISTOGRAM" {
			t.Errorf("writ_request_duration_seconds: %v", fams["writ_request_duration_seconds"])
		}
		if n := sumCounter(fams["writ_tcp_connections_total"]); n < 2 {
			t.Errorf("writ_tcp_connections_total = %v, want 2 (one allowed, one denied)", n)
		}
		// The frontend's retries over its dead endpoint.
		if n := sumCounter(scrape(t, frontAdmin+"/metrics")["writ_upstream_retries_total"]); n < 1 {
			t.Errorf("writ_upstream_retries_total = %v, want retries past the dead endpoint", n)
		}
	})
	t.Run("readyz and config_dump", func(t *testing.T) {
		code, body, _ := get(t, h1, s.registry+"/readyz", nil)
		if code != 200 {
			t.Fatalf("readyz: %d %s", code, body)
		}
		code, body, _ = get(t, h1, frontAdmin+"/config_dump", nil)
		if code != 200 || !strings.Contains(body, `"peer_ids"`) {
			t.Fatalf("config_dump: %d %s", code, body)
		}
	})
	t.Run("graceful drain", func(t *testing.T) {
		type result struct {
			code int
			body string
			err  error
		}
		done := make(chan result, 1)
		go func() {
			resp, err := h1.Get("http://" + front.Addr("orders") + "/slow")
			if err != nil {
				done <- result{err: err}
				return
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			done <- result{resp.StatusCode, string(b), err}
		}()
		for h := range s.seen { // until the slow request reaches the app
			if h.Get("Test-Path") == "/slow" {
				break
			}
		}
		stopped := make(chan error, 1)
		go func() { stopped <- s.stop() }()
		// Drain stops accepting: a new connection to the mesh port fails.
		for i := 0; ; i++ {
			c, err := net.DialTimeout("tcp", s.proxy.Addr("http"), time.Second)
			if err != nil {
				break
			}
			c.Close()
			if i > 200 {
				t.Fatal("the mesh port still accepts after drain began")
			}
			time.Sleep(5 * time.Millisecond)
		}
		close(s.release)
		r := <-done
		if r.err != nil || r.code != 200 || r.body != "orders HTTP/1.1 /slow" {
			t.Fatalf("in-flight request across drain: %d %q %v", r.code, r.body, r.err)
		}
		if err := <-stopped; err != nil {
			t.Fatalf("drain: %v", err)
		}
	})
}

func containsStr(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func mustURL(s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return u
}

// scrape reads a Prometheus exposition with Prometheus's own parser.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse %s: %v", url, err)
	}
	return fams
}

func sumCounter(f *dto.MetricFamily) float64 {
	var n float64
	for _, m := range f.GetMetric() {
		n += m.GetCounter().GetValue()
	}
	return n
}
