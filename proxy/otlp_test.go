package proxy

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/writmesh/writ/enforcer/regotest"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
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
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" || r.Header.Get("Content-Type") != "application/x-protobuf" {
			t.Errorf("otlp receiver: %s %s (%s)", r.Method, r.URL.Path, r.Header.Get("Content-Type"))
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		b, _ := io.ReadAll(r.Body)
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
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return "http://" + l.Addr().String(), spans
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
	appL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	appSrv := &http.Server{Handler: echoApp(seen)}
	go appSrv.Serve(appL)
	t.Cleanup(func() { appSrv.Close() })
	srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appL.Addr().String()}}},
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
			appL, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			appSrv := &http.Server{Handler: echoApp(seen)}
			go appSrv.Serve(appL)
			t.Cleanup(func() { appSrv.Close() })
			srv := startProxy(t, &Config{Inbound: []Inbound{{Name: "mesh", Address: "127.0.0.1:0", Service: "server", App: appL.Addr().String()}}},
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
