package proxy

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"log/slog"
	"maps"
	"math"
	"math/big"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/writmesh/writ/enforcer/regotest"
	"github.com/writmesh/writ/internal/syncbuf"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// otlpReceiver is an OTLP/HTTP traces endpoint on a real socket. It
// decodes with the collector service's own message type, so the
// hand-framed ExportTraceServiceRequest of the exporter is checked against
// the real schema.
func otlpReceiver(t *testing.T) (string, <-chan *tracepb.Span) {
	t.Helper()
	spans := make(chan *tracepb.Span, 100)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: otlpHTTPHandler(t, spans, nil)}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return "http://" + l.Addr().String(), spans
}

// otlpHTTPRequest is what an OTLP/HTTP collector saw of one export.
type otlpHTTPRequest struct {
	encoding  string // Content-Encoding
	wireBytes int    // body as sent
	bytes     int    // body decoded
}

// otlpHTTPHandler is a collector's /v1/traces: it takes a gzip body as
// collectors do (Content-Encoding: gzip) and refuses other encodings;
// when reqs is not nil it reports each request there.
func otlpHTTPHandler(t *testing.T, spans chan<- *tracepb.Span, reqs chan<- otlpHTTPRequest) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" || r.Header.Get("Content-Type") != "application/x-protobuf" {
			t.Errorf("otlp receiver: %s %s (%s)", r.Method, r.URL.Path, r.Header.Get("Content-Type"))
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		wire, _ := io.ReadAll(r.Body)
		b := wire
		switch enc := r.Header.Get("Content-Encoding"); enc {
		case "":
		case "gzip":
			zr, err := gzip.NewReader(bytes.NewReader(wire))
			if err == nil {
				b, err = io.ReadAll(zr)
			}
			if err != nil {
				t.Errorf("otlp receiver: gzip body: %v", err)
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
		default:
			t.Errorf("otlp receiver: Content-Encoding %q", enc)
			http.Error(w, "unsupported encoding", http.StatusUnsupportedMediaType)
			return
		}
		if reqs != nil {
			reqs <- otlpHTTPRequest{encoding: r.Header.Get("Content-Encoding"), wireBytes: len(wire), bytes: len(b)}
		}
		var req collectorpb.ExportTraceServiceRequest
		if err := proto.Unmarshal(b, &req); err != nil {
			t.Errorf("otlp receiver: %v", err)
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		for _, rs := range req.GetResourceSpans() {
			for _, ss := range rs.GetScopeSpans() {
				for _, s := range ss.GetSpans() {
					spans <- s
				}
			}
		}
		out, _ := proto.Marshal(&collectorpb.ExportTraceServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	})
}

// TestOTLPTraceAcrossTwoHops: a request from an app that sends its own
// traceparent crosses the client's outbound sidecar and the server's
// inbound sidecar; both export their span to a real OTLP/HTTP receiver.
// One trace: the outbound CLIENT span is a child of the app's span, the
// inbound SERVER span a child of the outbound one, and the server app sees
// the inbound span as its parent.
func TestOTLPTraceAcrossTwoHops(t *testing.T) {
	base, spans := otlpReceiver(t)
	tracesURL, err := OTLPTracesURL(base+"/", "")
	if err != nil || tracesURL != base+"/v1/traces" {
		t.Fatalf("OTLPTracesURL: %q, %v", tracesURL, err)
	}
	ca := newTestCA(t)
	seen := make(chan http.Header, 1)
	appAddr := serveApp(t, echoApp(seen))
	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appAddr}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, &decisions{}),
			OTLPTracesURL: tracesURL, ServiceName: "server"})
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), OTLPTracesURL: tracesURL, ServiceName: "client"})

	const traceID, appSpan = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	req, _ := http.NewRequest("GET", "http://"+cli.Addr("upstream:server")+"/traced", nil)
	req.Header.Set("Traceparent", "00-"+traceID+"-"+appSpan+"-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("request: %d", resp.StatusCode)
	}
	appTP := (<-seen).Get("Traceparent")

	var out, in *tracepb.Span
	deadline := time.After(30 * time.Second)
	for out == nil || in == nil {
		select {
		case s := <-spans:
			switch s.GetKind() {
			case tracepb.Span_SPAN_KIND_CLIENT:
				out = s
			case tracepb.Span_SPAN_KIND_SERVER:
				in = s
			}
		case <-deadline:
			t.Fatalf("spans received: outbound %v, inbound %v", out, in)
		}
	}
	hx := hex.EncodeToString
	if hx(out.TraceId) != traceID || hx(in.TraceId) != traceID {
		t.Fatalf("trace ids: outbound %s, inbound %s, want %s", hx(out.TraceId), hx(in.TraceId), traceID)
	}
	if hx(out.ParentSpanId) != appSpan {
		t.Errorf("outbound span's parent %s, want the app's span %s", hx(out.ParentSpanId), appSpan)
	}
	if !bytes.Equal(in.ParentSpanId, out.SpanId) || bytes.Equal(in.SpanId, out.SpanId) {
		t.Errorf("inbound span %s parent %s, want a new span under outbound %s", hx(in.SpanId), hx(in.ParentSpanId), hx(out.SpanId))
	}
	if want := "00-" + traceID + "-" + hx(in.SpanId) + "-01"; appTP != want {
		t.Errorf("server app saw traceparent %q, want %q", appTP, want)
	}
	if out.Name != "GET" || out.EndTimeUnixNano < out.StartTimeUnixNano || in.StartTimeUnixNano == 0 {
		t.Errorf("span fields: outbound %v, inbound %v", out, in)
	}
	attrs := map[string]string{}
	for _, kv := range in.Attributes {
		attrs[kv.Key] = kv.Value.GetStringValue()
	}
	if attrs["url.path"] != "/traced" || attrs["writ.source"] != "spiffe://example.org/ns/demo/sa/client" || attrs["writ.authz_result"] != "allow" || attrs["writ.decision_id"] == "" {
		t.Errorf("inbound span attributes: %v", attrs)
	}

	for _, bad := range []string{"ftp://x/v1/traces", "localhost:4318", "http://"} {
		if _, err := OTLPTracesURL("", bad); err == nil {
			t.Errorf("OTLPTracesURL accepted %q", bad)
		}
	}
}

// TestOTLPExporterSameRegistry: a proxy that fails to start (here: its
// port is taken) leaves the registry usable for the next attempt (the xDS
// client's next configuration), OTLP counter included.
func TestOTLPExporterSameRegistry(t *testing.T) {
	ca := newTestCA(t)
	reg := prometheus.NewRegistry()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	const url = "http://127.0.0.1:4318/v1/traces"
	bad := &Config{Inbound: []Inbound{{Name: "mesh", Address: taken.Addr().String(), Service: "s", App: "127.0.0.1:1"}}}
	if _, err := New(bad, Options{Source: ca.source(t, "/ns/demo/sa/client"), Registry: reg, OTLPTracesURL: url}); err == nil {
		t.Fatal("a proxy on a taken port started")
	}
	p, err := New(&Config{}, Options{Source: ca.source(t, "/ns/demo/sa/client"), Registry: reg, OTLPTracesURL: url})
	if err != nil {
		t.Fatalf("second attempt on the same registry: %v", err)
	}
	p.Close()
	if _, err := New(&Config{}, Options{Source: ca.source(t, "/ns/demo/sa/client"), OTLPTracesURL: "collector:4318"}); err == nil {
		t.Fatal("an OTLP URL without a scheme was accepted")
	}
}

// otlpGRPCReceiver is the collector's generated TraceService on a real
// gRPC socket.
type otlpGRPCReceiver struct {
	collectorpb.UnimplementedTraceServiceServer
	spans    chan *tracepb.Span
	services chan string
}

func (r *otlpGRPCReceiver) Export(_ context.Context, req *collectorpb.ExportTraceServiceRequest) (*collectorpb.ExportTraceServiceResponse, error) {
	for _, rs := range req.GetResourceSpans() {
		for _, kv := range rs.GetResource().GetAttributes() {
			if kv.Key == "service.name" {
				select {
				case r.services <- kv.Value.GetStringValue():
				default:
				}
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				r.spans <- s
			}
		}
	}
	return &collectorpb.ExportTraceServiceResponse{}, nil
}

func startOTLPGRPC(t *testing.T) (string, *otlpGRPCReceiver) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &otlpGRPCReceiver{spans: make(chan *tracepb.Span, 1000), services: make(chan string, 10)}
	srv := grpc.NewServer()
	collectorpb.RegisterTraceServiceServer(srv, r)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	return "http://" + l.Addr().String(), r
}

// TestOTLPGRPCSampling runs two sidecar hops exporting over OTLP/gRPC to
// the collector's generated service. The client sidecar samples new
// traces with the given ratio (from a seeded source); the server sidecar
// samples new traces at ratio 0 (and has no random source at all), so
// the spans it exports show that it follows the incoming sampled flag. After the requests a sentinel with a
// sampled incoming traceparent is sent: each exporter sends in order, so
// once both sentinel spans are in, everything sampled before them is too.
func TestOTLPGRPCSampling(t *testing.T) {
	for _, tc := range []struct {
		ratio    float64
		n        int
		min, max int
	}{
		{ratio: 0, n: 20, min: 0, max: 0},
		// mean 100, sd 7.1: ±4 sd
		{ratio: 0.5, n: 200, min: 72, max: 128},
		{ratio: 1, n: 20, min: 20, max: 20},
	} {
		t.Run(fmt.Sprint(tc.ratio), func(t *testing.T) {
			target, rcv := startOTLPGRPC(t)
			ca := newTestCA(t)
			seen := make(chan http.Header, 1)
			appAddr := serveApp(t, echoApp(seen))
			srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appAddr}}},
				Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, &decisions{}),
					OTLPTracesURL: target, OTLPProtocol: OTLPProtocolGRPC, ServiceName: "server", TraceSampler: newTraceSampler(0, nil)})
			cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
			cfg.AddUpstream("server", "127.0.0.1:0")
			rnd := rand.New(rand.NewPCG(1, 2))
			cli := startProxy(t, cfg, Options{Source: ca.source(t, "/ns/demo/sa/client"), OTLPTracesURL: target, OTLPProtocol: OTLPProtocolGRPC,
				ServiceName: "client", TraceSampler: newTraceSampler(tc.ratio, rnd.Uint64)})

			get := func(tp string) string {
				t.Helper()
				req, _ := http.NewRequest("GET", "http://"+cli.Addr("upstream:server")+"/s", nil)
				if tp != "" {
					req.Header.Set("Traceparent", tp)
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Fatalf("request: %d", resp.StatusCode)
				}
				return (<-seen).Get("Traceparent")
			}
			sampled := map[string]bool{}
			for range tc.n {
				tp := get("")
				switch tp[53:] {
				case "01":
					sampled[tp[3:35]] = true
				case "00":
				default:
					t.Fatalf("app saw traceparent %q", tp)
				}
			}
			t.Logf("ratio %v: %d of %d new traces sampled", tc.ratio, len(sampled), tc.n)
			if len(sampled) < tc.min || len(sampled) > tc.max {
				t.Errorf("ratio %v: %d of %d new traces sampled, want %d to %d", tc.ratio, len(sampled), tc.n, tc.min, tc.max)
			}
			const sentinel = "4bf92f3577b34da6a3ce929d0e0e4736"
			if tp := get("00-" + sentinel + "-00f067aa0ba902b7-01"); tp[53:] != "01" {
				t.Errorf("sampled parent propagated as %q", tp)
			}

			exported := map[string]int{}
			var sentinels int
			deadline := time.After(30 * time.Second)
			for sentinels < 2 {
				select {
				case s := <-rcv.spans:
					id := hex.EncodeToString(s.TraceId)
					if id == sentinel {
						sentinels++
						continue
					}
					exported[id]++
				case <-deadline:
					t.Fatalf("sentinel spans: %d of 2", sentinels)
				}
			}
			// Each sampled trace has a CLIENT and a SERVER span; nothing
			// unsampled is exported.
			for id := range sampled {
				if exported[id] != 2 {
					t.Errorf("sampled trace %s: %d spans exported, want 2", id, exported[id])
				}
			}
			for id, n := range exported {
				if !sampled[id] {
					t.Errorf("unsampled trace %s: %d spans exported", id, n)
				}
			}
			if svc := <-rcv.services; svc != "server" && svc != "client" {
				t.Errorf("service.name %q", svc)
			}
		})
	}
}

func TestTraceSamplerRatio(t *testing.T) {
	for _, bad := range []float64{-0.1, 1.5, math.NaN()} {
		if _, err := NewTraceSampler(bad); err == nil {
			t.Errorf("NewTraceSampler(%v) accepted", bad)
		}
	}
	var nilS *TraceSampler
	if !nilS.sampleRoot() {
		t.Error("nil sampler dropped a trace")
	}
	if s, _ := NewTraceSampler(0); s.sampleRoot() {
		t.Error("ratio 0 sampled")
	}
	if s, _ := NewTraceSampler(1); !s.sampleRoot() {
		t.Error("ratio 1 dropped")
	}
	for c, want := range map[byte]bool{'0': false, '1': true, '9': true, 'a': false, 'b': true, 'f': true} {
		if sampledFlag(c) != want {
			t.Errorf("sampledFlag(%q) = %v", c, !want)
		}
	}
	if _, err := OTLPGRPCTarget("", "http://collector:4317/v1/traces"); err == nil {
		t.Error("OTLPGRPCTarget accepted a path")
	}
}

// otlpPKI is a collector's CA with a server certificate for 127.0.0.1
// and a client certificate, written as PEM files as an operator would
// give them to writ-proxy.
type otlpPKI struct {
	caFile, certFile, keyFile string
	server                    tls.Certificate
	pool                      *x509.CertPool
}

func newOTLPPKI(t *testing.T) *otlpPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "collector ca"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(crand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, usage x509.ExtKeyUsage, ips ...net.IP) ([]byte, *ecdsa.PrivateKey) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "leaf"}, NotBefore: time.Now().Add(-time.Hour),
			NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature, IPAddresses: ips}
		der, err := x509.CreateCertificate(crand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der, key
	}
	writePEM := func(name, typ string, b []byte) string {
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	p := &otlpPKI{pool: x509.NewCertPool()}
	p.pool.AddCert(caCert)
	p.caFile = writePEM("ca.pem", "CERTIFICATE", caDER)
	srvDER, srvKey := leaf(2, x509.ExtKeyUsageServerAuth, net.IPv4(127, 0, 0, 1))
	p.server = tls.Certificate{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}
	cliDER, cliKey := leaf(3, x509.ExtKeyUsageClientAuth)
	p.certFile = writePEM("client.pem", "CERTIFICATE", cliDER)
	keyDER, _ := x509.MarshalECPrivateKey(cliKey)
	p.keyFile = writePEM("client-key.pem", "EC PRIVATE KEY", keyDER)
	return p
}

// serverTLS requires a client certificate from the collector's CA.
func (p *otlpPKI) serverTLS() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{p.server}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: p.pool}
}

// The API key header a collector requires: a value with characters that
// OTEL_EXPORTER_OTLP_HEADERS percent-encodes.
const (
	otlpKeyHeader = "X-Api-Key"
	otlpKeyValue  = "s3cr3t, =key"
	otlpHeaderEnv = "x-api-key=s3cr3t%2C%20%3Dkey,other=1"
)

// startSecureCollector is an OTLP collector over https (net/http) or
// gRPC with TLS (the generated TraceService) requiring a client
// certificate and the API key; it sends what it accepts on spans.
func startSecureCollector(t *testing.T, protocol string, pki *otlpPKI) (string, <-chan *tracepb.Span) {
	t.Helper()
	target, spans, _ := startSecureCollectorAt(t, protocol, pki, "127.0.0.1:0")
	return target, spans
}

// startSecureCollectorAt is startSecureCollector on addr (retrying while
// a stopped collector's port frees); stop closes it and its connections.
func startSecureCollectorAt(t *testing.T, protocol string, pki *otlpPKI, addr string) (target string, spans <-chan *tracepb.Span, stop func()) {
	t.Helper()
	var l net.Listener
	var err error
	for range 100 {
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if protocol == OTLPProtocolGRPC {
		r := &otlpGRPCReceiver{spans: make(chan *tracepb.Span, 1000), services: make(chan string, 10)}
		srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(pki.serverTLS())), grpc.UnaryInterceptor(
			func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
				md, _ := metadata.FromIncomingContext(ctx)
				if v := md.Get(strings.ToLower(otlpKeyHeader)); len(v) != 1 || v[0] != otlpKeyValue {
					return nil, status.Error(codes.Unauthenticated, "api key")
				}
				return h(ctx, req)
			}))
		collectorpb.RegisterTraceServiceServer(srv, r)
		go srv.Serve(l)
		t.Cleanup(srv.Stop)
		return "https://" + l.Addr().String(), r.spans, srv.Stop
	}
	base, spans := otlpReceiver(t)
	next, _ := url.Parse(base)
	rp := httputil.NewSingleHostReverseProxy(next)
	srv := &http.Server{TLSConfig: pki.serverTLS(), ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(otlpKeyHeader) != otlpKeyValue {
			http.Error(w, "api key", http.StatusUnauthorized)
			return
		}
		rp.ServeHTTP(w, r)
	})}
	go srv.ServeTLS(l, "", "")
	t.Cleanup(func() { srv.Close() })
	return "https://" + l.Addr().String() + "/v1/traces", spans, func() { srv.Close() }
}

// spanCounts reads writ_otlp_spans_total by result.
func spanCounts(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "writ_otlp_spans_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			out[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	return out
}

// tracedClient starts a server sidecar (not exporting) and a client
// sidecar exporting with opts (the OTLP fields) on a fake clock; get
// sends a request through them and fails the test unless it is served.
func tracedClient(t *testing.T, opts Options) (get func(), clock *clockwork.FakeClock, reg *prometheus.Registry, cli *Proxy) {
	t.Helper()
	ca := newTestCA(t)
	appAddr := serveApp(t, echoApp(nil))
	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appAddr}}},
		Options{Source: ca.source(t, "/ns/demo/sa/server"), Enforcer: regotest.Enforcer(t, allowClientRego, &decisions{})})
	cfg := &Config{Clusters: []Cluster{{Name: "server", Endpoints: []Endpoint{{Address: srv.Addr("mesh")}}, PeerIDs: []string{"spiffe://example.org/ns/demo/sa/server"}}}}
	cfg.AddUpstream("server", "127.0.0.1:0")
	clock = clockwork.NewFakeClockAt(time.Now())
	reg = prometheus.NewRegistry()
	opts.Source, opts.Clock, opts.Registry, opts.ServiceName = ca.source(t, "/ns/demo/sa/client"), clock, reg, "client"
	cli = startProxy(t, cfg, opts)
	client := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(client.CloseIdleConnections)
	get = func() {
		t.Helper()
		resp, err := client.Get("http://" + cli.Addr("upstream:server") + "/traced")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request: %d", resp.StatusCode)
		}
	}
	return get, clock, reg, cli
}

// waitCounts advances the proxy's clock (flush ticks, export timeouts)
// until the span counters read want.
func waitCounts(t *testing.T, clock *clockwork.FakeClock, reg *prometheus.Registry, step time.Duration, want map[string]float64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := spanCounts(t, reg)
		if maps.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("writ_otlp_spans_total %v, want %v", got, want)
		}
		clock.Advance(step)
		time.Sleep(time.Millisecond)
	}
}

// TestOTLPExportMTLSAndHeaders: for both transports, a collector that
// requires a client certificate from its CA and an API key header gets
// the spans of a sidecar configured as OpenTelemetry's environment
// configures exporters (CA, client certificate and key as PEM files,
// percent-encoded headers). Without the client certificate, or without
// the header, it gets none and the spans are counted failed.
func TestOTLPExportMTLSAndHeaders(t *testing.T) {
	pki := newOTLPPKI(t)
	headers, err := ParseOTLPHeaders(otlpHeaderEnv)
	if err != nil || headers["x-api-key"] != otlpKeyValue || headers["other"] != "1" {
		t.Fatalf("ParseOTLPHeaders: %v %v", headers, err)
	}
	full, err := OTLPTLSConfig(pki.caFile, pki.certFile, pki.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	caOnly, err := OTLPTLSConfig(pki.caFile, "", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, protocol := range []string{OTLPProtocolHTTP, OTLPProtocolGRPC} {
		for _, tc := range []struct {
			name     string
			tls      *OTLPTLS
			headers  map[string]string
			accepted bool
		}{
			{"client certificate and key", full, headers, true},
			{"no client certificate", caOnly, headers, false},
			{"no api key", full, nil, false},
		} {
			t.Run(protocol+"/"+tc.name, func(t *testing.T) {
				target, spans := startSecureCollector(t, protocol, pki)
				get, clock, reg, _ := tracedClient(t, Options{OTLPTracesURL: target, OTLPProtocol: protocol,
					OTLP: OTLPExport{TLS: tc.tls, Headers: tc.headers}})
				const n = 3
				for range n {
					get()
				}
				if tc.accepted {
					waitCounts(t, clock, reg, traceFlush, map[string]float64{"exported": n})
					for range n {
						if s := <-spans; s.GetKind() != tracepb.Span_SPAN_KIND_CLIENT {
							t.Errorf("span kind %v", s.GetKind())
						}
					}
					return
				}
				waitCounts(t, clock, reg, traceFlush, map[string]float64{"failed": n})
				select {
				case s := <-spans:
					t.Fatalf("collector got span %x", s.GetSpanId())
				default:
				}
			})
		}
	}
}

// TestOTLPExportRotation: for both transports, the exporter follows its
// TLS files without a restart. A collector requiring client certificates
// of CA1 gets spans. A client certificate file overwritten with garbage
// is logged and the last good certificate kept: a collector restarted
// (so the exporter connects anew) still gets spans. Then the collector
// is replaced by one with a server certificate of CA2 that requires
// client certificates of CA2, and the CA, certificate and key files are
// rotated to CA2's: spans arrive again.
func TestOTLPExportRotation(t *testing.T) {
	headers, err := ParseOTLPHeaders(otlpHeaderEnv)
	if err != nil {
		t.Fatal(err)
	}
	for _, protocol := range []string{OTLPProtocolHTTP, OTLPProtocolGRPC} {
		t.Run(protocol, func(t *testing.T) {
			pki1, pki2 := newOTLPPKI(t), newOTLPPKI(t)
			files, err := OTLPTLSConfig(pki1.caFile, pki1.certFile, pki1.keyFile)
			if err != nil {
				t.Fatal(err)
			}
			target, spans, stop := startSecureCollectorAt(t, protocol, pki1, "127.0.0.1:0")
			u, _ := url.Parse(target)
			logs := &syncbuf.Buffer{}
			get, clock, reg, _ := tracedClient(t, Options{OTLPTracesURL: target, OTLPProtocol: protocol,
				OTLP: OTLPExport{TLS: files, Headers: headers}, Log: slog.New(slog.NewTextHandler(logs, nil))})
			// arrives sends requests until one's span reaches the collector.
			arrives := func(what string, spans <-chan *tracepb.Span) {
				t.Helper()
				deadline := time.Now().Add(30 * time.Second)
				for {
					get()
					for range 20 {
						clock.Advance(traceFlush)
						select {
						case <-spans:
							return
						case <-time.After(10 * time.Millisecond):
						}
					}
					if time.Now().After(deadline) {
						t.Fatalf("%s: no span reached the collector in 30 s (%v)", what, spanCounts(t, reg))
					}
				}
			}
			arrives("CA1", spans)

			replace(t, pki1.certFile, []byte("not a certificate\n"))
			stop()
			_, spans, stop = startSecureCollectorAt(t, protocol, pki1, u.Host)
			arrives("a garbled certificate file", spans)
			if !strings.Contains(logs.String(), "cannot be used; keeping the last good") || !strings.Contains(logs.String(), pki1.certFile) {
				t.Errorf("no error logged for the garbled file:\n%s", logs)
			}

			stop()
			for src, dst := range map[string]string{pki2.caFile: pki1.caFile, pki2.certFile: pki1.certFile, pki2.keyFile: pki1.keyFile} {
				b, err := os.ReadFile(src)
				if err != nil {
					t.Fatal(err)
				}
				replace(t, dst, b)
			}
			_, spans, _ = startSecureCollectorAt(t, protocol, pki2, u.Host)
			arrives("CA2", spans)
			if !strings.Contains(logs.String(), "otlp tls: certificates reloaded") {
				t.Errorf("no reload logged:\n%s", logs)
			}
		})
	}
}

// replace swaps a file's content as rotations do, by rename.
func replace(t *testing.T, name string, b []byte) {
	t.Helper()
	tmp := name + ".new"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, name); err != nil {
		t.Fatal(err)
	}
}

// blackHole accepts connections and never answers; accepted receives
// each. Its connections are closed before the proxies are stopped (the
// last flush at shutdown would otherwise wait on the fake clock).
func blackHole(t *testing.T) (string, <-chan struct{}) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan struct{}, 100)
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			accepted <- struct{}{}
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String(), accepted
}

// TestOTLPUnreachableCollector: for both transports, a collector on a
// closed port and one that accepts and never answers cost requests
// through the sidecar nothing (they are served while the exporter is
// stuck), the spans are counted failed, and beyond the queue's bound
// dropped.
func TestOTLPUnreachableCollector(t *testing.T) {
	for _, protocol := range []string{OTLPProtocolHTTP, OTLPProtocolGRPC} {
		endpoint := func(addr string) string {
			if protocol == OTLPProtocolGRPC {
				return "http://" + addr
			}
			return "http://" + addr + "/v1/traces"
		}
		t.Run(protocol+"/closed port", func(t *testing.T) {
			// Not a port closed after a listen: handed out again to one of
			// the proxies' own listeners, it made the exporter send spans
			// through the proxy, each traced and exported in turn.
			addr := refusedAddr(t)
			get, clock, reg, _ := tracedClient(t, Options{OTLPTracesURL: endpoint(addr), OTLPProtocol: protocol})
			for range 5 {
				get()
			}
			waitCounts(t, clock, reg, traceFlush, map[string]float64{"failed": 5})
		})
		t.Run(protocol+"/black hole", func(t *testing.T) {
			const timeout = 5 * time.Second
			addr, accepted := blackHole(t)
			get, clock, reg, cli := tracedClient(t, Options{OTLPTracesURL: endpoint(addr), OTLPProtocol: protocol, OTLP: OTLPExport{Timeout: timeout}})
			cli.traces.mu.Lock()
			cli.traces.maxPending = 4
			cli.traces.mu.Unlock()
			get()
			get()
			// The first batch (2 spans) goes to the black hole; the
			// exporter now waits on it.
			deadline := time.Now().Add(30 * time.Second)
			for len(accepted) == 0 {
				if time.Now().After(deadline) {
					t.Fatal("the exporter never reached the black hole")
				}
				clock.Advance(traceFlush)
				time.Sleep(time.Millisecond)
			}
			waitPending(t, cli, 0)
			// Requests are served meanwhile; 4 spans wait, 2 are dropped.
			for range 6 {
				get()
			}
			waitCounts(t, clock, reg, 0, map[string]float64{"dropped": 2})
			waitPending(t, cli, 4)
			// Each export gives up at the timeout, on the proxy's clock.
			waitCounts(t, clock, reg, timeout, map[string]float64{"dropped": 2, "failed": 6})
		})
	}
}

func waitPending(t *testing.T, p *Proxy, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		p.traces.mu.Lock()
		got := len(p.traces.pending)
		p.traces.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d spans pending, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestOTLPExportSettings: bad settings are start-up errors that never
// show a header's value.
func TestOTLPExportSettings(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"novalue", "want key=value"},
		{"bad key=secret-1", "invalid header name"},
		{"k=%zzsecret-2", "k: invalid value"},
		{"k=a%0Dsecret-3", "k: invalid value"},
		{"grpc-timeout=1", "reserved"},
	} {
		_, err := ParseOTLPHeaders(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "secret") {
			t.Errorf("ParseOTLPHeaders(%q): %v, want an error with %q and no value", tc.in, err, tc.want)
		}
	}
	if h, err := ParseOTLPHeaders(" a = 1 , ,b=2=3"); err != nil || h["a"] != "1" || h["b"] != "2=3" {
		t.Errorf("ParseOTLPHeaders: %v %v", h, err)
	}
	pki := newOTLPPKI(t)
	for _, files := range [][3]string{
		{"/nonexistent/ca.pem", "", ""},
		{pki.certFile + ".missing", "", ""},
		{"", pki.certFile, ""},
		{"", "", pki.keyFile},
		{pki.keyFile, "", ""}, // a key is not a CA
		{"", pki.certFile, pki.caFile},
	} {
		if _, err := OTLPTLSConfig(files[0], files[1], files[2]); err == nil {
			t.Errorf("OTLPTLSConfig(%q) accepted", files)
		}
	}
	tlsCfg, err := OTLPTLSConfig(pki.caFile, "", "")
	if err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t)
	if _, err := New(&Config{}, Options{Source: ca.source(t, "/ns/demo/sa/client"), OTLPTracesURL: "http://collector:4318/v1/traces", OTLP: OTLPExport{TLS: tlsCfg}}); err == nil || !strings.Contains(err.Error(), "not https") {
		t.Errorf("a CA with a plaintext endpoint: %v", err)
	}
}

// TestOTLPExportNoRedirect: a collector answering with a redirect fails
// the export; the headers (an API key) never reach where it points.
func TestOTLPExportNoRedirect(t *testing.T) {
	reached := make(chan http.Header, 1)
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case reached <- r.Header.Clone():
		default:
		}
	}))
	t.Cleanup(elsewhere.Close)
	collector := httptest.NewServer(http.RedirectHandler(elsewhere.URL+"/v1/traces", http.StatusTemporaryRedirect))
	t.Cleanup(collector.Close)
	e, err := newTraceExporter(collector.URL+"/v1/traces", OTLPProtocolHTTP, "svc", OTLPExport{Headers: map[string]string{"X-Api-Key": "secret"}}, clockwork.NewRealClock(), prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.export(context.Background(), []*tracepb.Span{{Name: "s"}}); err == nil || !strings.Contains(err.Error(), "307") {
		t.Errorf("export answered by a redirect: %v, want a failure naming it", err)
	}
	select {
	case h := <-reached:
		t.Fatalf("the redirect was followed, with X-Api-Key %q", h.Get("X-Api-Key"))
	default:
	}
}
