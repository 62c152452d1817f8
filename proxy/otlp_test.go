package proxy

import (
	"bytes"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/writmesh/writ/enforcer/regotest"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
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
