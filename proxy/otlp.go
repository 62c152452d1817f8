package proxy

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// OTLP/HTTP trace export. Spans are batched in memory (bounded: beyond
// maxPendingSpans new spans are dropped and counted, never queued without
// limit) and POSTed as protobuf on the proxy's flush tick by one goroutine,
// so a slow or absent collector costs requests nothing.
const (
	maxPendingSpans = 4096
	maxExportBatch  = 1024
	exportTimeout   = 10 * time.Second
	traceFlush      = time.Second
)

// traceExporter sends spans to an OTLP/HTTP traces endpoint.
type traceExporter struct {
	url      string
	client   *http.Client
	resource *resourcepb.Resource
	spans    *prometheus.CounterVec

	mu      sync.Mutex
	pending []*tracepb.Span
}

// OTLPTracesURL turns an OTLP/HTTP endpoint into the URL spans are POSTed
// to, as OpenTelemetry's SDKs read their environment: a signal-specific
// endpoint (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is used as given, a base
// endpoint (OTEL_EXPORTER_OTLP_ENDPOINT) gets "/v1/traces" appended.
func OTLPTracesURL(base, traces string) (string, error) {
	u := traces
	if u == "" && base != "" {
		u = base
		if len(u) > 0 && u[len(u)-1] == '/' {
			u = u[:len(u)-1]
		}
		u += "/v1/traces"
	}
	if u == "" {
		return "", nil
	}
	pu, err := url.Parse(u)
	if err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
		return "", fmt.Errorf("otlp endpoint %q: want an http:// or https:// URL", u)
	}
	return u, nil
}

func newTraceExporter(u, service string, reg prometheus.Registerer) (*traceExporter, error) {
	spans := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "writ_otlp_spans_total", Help: "Spans given to the OTLP exporter, by result: exported, failed (the collector refused or was unreachable) or dropped (buffer full).",
	}, []string{"result"})
	// A proxy built again on the same registry (the xDS client's next
	// configuration) counts on the same series.
	if err := reg.Register(spans); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return nil, err
		}
		existing, ok := are.ExistingCollector.(*prometheus.CounterVec)
		if !ok {
			return nil, err
		}
		spans = existing
	}
	return &traceExporter{
		url:    u,
		client: &http.Client{Timeout: exportTimeout},
		resource: &resourcepb.Resource{Attributes: []*commonpb.KeyValue{
			strAttr("service.name", service),
			strAttr("telemetry.sdk.name", "writ-proxy"),
		}},
		spans: spans,
	}, nil
}

func strAttr(k, v string) *commonpb.KeyValue {
	return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: v}}}
}

func intAttr(k string, v int64) *commonpb.KeyValue {
	return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_IntValue{IntValue: v}}}
}

// record turns a finished request into a span: SERVER for inbound (its
// parent is the calling sidecar's span), CLIENT for outbound (its parent is
// the app's span, if the app sent a traceparent).
func (e *traceExporter) record(r *reqLog, end time.Time) {
	var tid [16]byte
	var sid, pid [8]byte
	if !decodeHex(tid[:], r.span.traceID) || !decodeHex(sid[:], r.span.spanID) {
		return
	}
	s := &tracepb.Span{
		TraceId:           tid[:],
		SpanId:            sid[:],
		Name:              r.method,
		Kind:              tracepb.Span_SPAN_KIND_CLIENT,
		StartTimeUnixNano: uint64(end.Add(-r.dur).UnixNano()),
		EndTimeUnixNano:   uint64(end.UnixNano()),
		Attributes: []*commonpb.KeyValue{
			strAttr("http.request.method", r.method),
			strAttr("url.path", r.path),
			strAttr("network.protocol.name", "http"),
			intAttr("http.response.status_code", int64(r.status)),
			strAttr("writ.direction", r.direction),
			strAttr("writ.source", r.source),
			strAttr("writ.destination_service", r.dest),
			strAttr("writ.authz_result", r.authz),
		},
	}
	if r.direction == "inbound" {
		s.Kind = tracepb.Span_SPAN_KIND_SERVER
	}
	if r.decisionID != "" {
		s.Attributes = append(s.Attributes, strAttr("writ.decision_id", r.decisionID))
	}
	if decodeHex(pid[:], r.span.parentID) {
		s.ParentSpanId = pid[:]
	}
	if r.status >= 500 {
		s.Status = &tracepb.Status{Code: tracepb.Status_STATUS_CODE_ERROR}
	}
	e.mu.Lock()
	if len(e.pending) >= maxPendingSpans {
		e.mu.Unlock()
		e.spans.WithLabelValues("dropped").Inc()
		return
	}
	e.pending = append(e.pending, s)
	e.mu.Unlock()
}

func decodeHex(dst []byte, s string) bool {
	if len(s) != 2*len(dst) {
		return false
	}
	_, err := hex.Decode(dst, []byte(s))
	return err == nil
}

// run exports on every tick until ctx ends, then once more within
// exportTimeout.
func (e *traceExporter) run(ctx context.Context, tick <-chan time.Time) {
	for {
		select {
		case <-tick:
			e.flush(ctx)
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.Background(), exportTimeout)
			e.flush(fctx)
			cancel()
			return
		}
	}
}

// flush sends what is pending in batches of at most maxExportBatch.
func (e *traceExporter) flush(ctx context.Context) {
	for {
		e.mu.Lock()
		n := min(len(e.pending), maxExportBatch)
		batch := e.pending[:n:n]
		e.pending = e.pending[n:]
		if len(e.pending) == 0 {
			e.pending = nil
		}
		e.mu.Unlock()
		if n == 0 {
			return
		}
		result := "exported"
		if err := e.export(ctx, batch); err != nil {
			result = "failed"
		}
		e.spans.WithLabelValues(result).Add(float64(n))
		if ctx.Err() != nil {
			return
		}
	}
}

// export POSTs one ExportTraceServiceRequest. Its only field is
// `repeated ResourceSpans resource_spans = 1`, written here with protowire
// so that the collector service's package (and its gRPC gateway
// dependencies) need not be linked.
func (e *traceExporter) export(ctx context.Context, spans []*tracepb.Span) error {
	rs := &tracepb.ResourceSpans{
		Resource:   e.resource,
		ScopeSpans: []*tracepb.ScopeSpans{{Scope: &commonpb.InstrumentationScope{Name: "github.com/writmesh/writ/proxy"}, Spans: spans}},
	}
	inner, err := proto.Marshal(rs)
	if err != nil {
		return err
	}
	body := protowire.AppendTag(nil, 1, protowire.BytesType)
	body = protowire.AppendBytes(body, inner)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-protobuf")
	resp, err := e.client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return errors.New("otlp export: " + resp.Status)
	}
	return nil
}
