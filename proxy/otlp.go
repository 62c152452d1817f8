package proxy

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"golang.org/x/net/http/httpguts"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	grpcgzip "google.golang.org/grpc/encoding/gzip" // registers the "gzip" compressor used by grpc.UseCompressor
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
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

// OTLPExport is how the exporter reaches its collector, for either
// transport: the settings OpenTelemetry's SDKs read from
// OTEL_EXPORTER_OTLP_[TRACES_]HEADERS, CERTIFICATE, CLIENT_CERTIFICATE,
// CLIENT_KEY, TIMEOUT and COMPRESSION.
type OTLPExport struct {
	// Headers go with every export (HTTP headers; gRPC metadata, keys
	// lowercased), typically an API key: their values are never logged.
	Headers map[string]string
	// TLS is used for an https:// endpoint: the CA (nil: the system's
	// roots) and a client certificate for a collector that requires one,
	// read again when their files change. It is an error with an http://
	// endpoint.
	TLS *OTLPTLS
	// Timeout bounds one export (a batch); zero is 10 s.
	Timeout time.Duration
	// Compression is OTLPCompressionGzip or OTLPCompressionNone (also
	// the empty string): over HTTP the body is gzipped with
	// Content-Encoding: gzip, over gRPC each message is compressed with
	// grpc-encoding: gzip.
	Compression string
}

// OTLP compressions, spelled as OTEL_EXPORTER_OTLP_COMPRESSION spells them.
const (
	OTLPCompressionGzip = "gzip"
	OTLPCompressionNone = "none"
)

// ParseOTLPHeaders reads OTEL_EXPORTER_OTLP_HEADERS' format: a comma
// separated key=value list, keys and values percent-decoded and trimmed
// of spaces. Errors name the key, never the value (a value is often a
// secret).
func ParseOTLPHeaders(s string) (map[string]string, error) {
	out := map[string]string{}
	for i, item := range strings.Split(s, ",") {
		if strings.TrimSpace(item) == "" {
			continue
		}
		k, v, ok := strings.Cut(item, "=")
		if !ok {
			return nil, fmt.Errorf("otlp headers: item %d: want key=value", i+1)
		}
		key, err := url.PathUnescape(strings.TrimSpace(k))
		if err != nil || !httpguts.ValidHeaderFieldName(key) {
			return nil, fmt.Errorf("otlp headers: item %d: invalid header name", i+1)
		}
		val, err := url.PathUnescape(strings.TrimSpace(v))
		if err != nil || !httpguts.ValidHeaderFieldValue(val) {
			return nil, fmt.Errorf("otlp headers: %s: invalid value (percent-encoding or control characters)", key)
		}
		lk := strings.ToLower(key)
		if strings.HasPrefix(lk, "grpc-") || lk == "content-type" || lk == "te" || lk == "host" || lk == "content-length" {
			return nil, fmt.Errorf("otlp headers: %s: reserved header", key)
		}
		out[key] = val
	}
	return out, nil
}

// OTLP transports, spelled as OTEL_EXPORTER_OTLP_PROTOCOL spells them.
const (
	OTLPProtocolHTTP = "http/protobuf"
	OTLPProtocolGRPC = "grpc"
)

// otlpGzipLevel is BestSpeed for both transports: on a 1,024-span batch
// it costs about a third of the default level's CPU for ~7% more bytes
// (BenchmarkOTLPGzip), and a sidecar's CPU is taken from its app's.
const otlpGzipLevel = gzip.BestSpeed

func init() {
	// grpc-go's gzip compressor is process-wide; in writ-proxy only the
	// OTLP exporter sends with it.
	if err := grpcgzip.SetLevel(otlpGzipLevel); err != nil {
		panic(err)
	}
}

// otlpExportMethod is TraceService.Export of OTLP's collector trace v1
// service; the test server registers the generated service, so a drift
// here fails there.
const otlpExportMethod = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

// traceExporter sends spans to an OTLP/HTTP traces URL or an OTLP/gRPC
// collector.
type traceExporter struct {
	url    string
	client *http.Client
	conn   *grpc.ClientConn // set for OTLP/gRPC
	// dial makes conn again when the TLS material changes.
	dial    func() (*grpc.ClientConn, error)
	tls     *OTLPTLS
	log     *slog.Logger
	headers map[string]string
	md      metadata.MD // headers, for gRPC
	timeout time.Duration
	gzip    bool
	// gz is kept between exports (only the exporter's goroutine uses
	// it): a compressor is ~1.2 MB of state, too much to make anew for
	// every batch. It is made at the first gzip export over HTTP.
	gz       *gzip.Writer
	clock    clockwork.Clock
	resource *resourcepb.Resource
	spans    *prometheus.CounterVec

	mu         sync.Mutex
	pending    []*tracepb.Span
	maxPending int
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

// OTLPGRPCTarget checks an OTLP/gRPC endpoint, which is used as given
// (no path is appended): http:// is plaintext, https:// is TLS.
func OTLPGRPCTarget(base, traces string) (string, error) {
	u := traces
	if u == "" {
		u = base
	}
	if u == "" {
		return "", nil
	}
	pu, err := url.Parse(u)
	if err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" || (pu.Path != "" && pu.Path != "/") {
		return "", fmt.Errorf("otlp grpc endpoint %q: want http://host:port or https://host:port", u)
	}
	return u, nil
}

// TraceSampler is a parent-based ratio sampler. A request that arrives
// with a traceparent keeps its sampled flag; a new trace is sampled with
// the ratio. Unsampled traces still propagate (flags 00) but are never
// exported. A nil *TraceSampler samples every new trace.
type TraceSampler struct {
	all       bool
	threshold uint64 // a new trace is sampled when rnd() < threshold
	rnd       func() uint64
}

// NewTraceSampler samples the given ratio (0 to 1) of new traces.
func NewTraceSampler(ratio float64) (*TraceSampler, error) {
	if !(ratio >= 0 && ratio <= 1) {
		return nil, fmt.Errorf("trace sample ratio %v: want 0 to 1", ratio)
	}
	return newTraceSampler(ratio, rand.Uint64), nil
}

func newTraceSampler(ratio float64, rnd func() uint64) *TraceSampler {
	if ratio >= 1 {
		return &TraceSampler{all: true}
	}
	return &TraceSampler{threshold: uint64(ratio * (1 << 64)), rnd: rnd}
}

func (s *TraceSampler) sampleRoot() bool {
	if s == nil || s.all {
		return true
	}
	return s.threshold != 0 && s.rnd() < s.threshold
}

func newTraceExporter(u, protocol, service string, x OTLPExport, clock clockwork.Clock, reg prometheus.Registerer, log *slog.Logger) (*traceExporter, error) {
	pu, err := url.Parse(u)
	if err != nil {
		return nil, err
	}
	if x.TLS != nil && pu.Scheme != "https" {
		return nil, fmt.Errorf("otlp endpoint %q: a CA or client certificate is set, but the endpoint is not https://", u)
	}
	if x.Timeout < 0 {
		return nil, fmt.Errorf("otlp timeout %v: want a positive duration", x.Timeout)
	}
	if x.Timeout == 0 {
		x.Timeout = exportTimeout
	}
	switch x.Compression {
	case "", OTLPCompressionNone, OTLPCompressionGzip:
	default:
		return nil, fmt.Errorf("otlp compression %q: want %s or %s", x.Compression, OTLPCompressionGzip, OTLPCompressionNone)
	}
	tlsCfg := x.TLS.config(pu.Hostname())
	md := metadata.MD{}
	for k, v := range x.Headers {
		md.Append(strings.ToLower(k), v)
	}
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
	var dial func() (*grpc.ClientConn, error)
	var conn *grpc.ClientConn
	if protocol == OTLPProtocolGRPC {
		creds := insecure.NewCredentials()
		if pu.Scheme == "https" {
			creds = credentials.NewTLS(tlsCfg.Clone())
		}
		dial = func() (*grpc.ClientConn, error) { return grpc.NewClient(pu.Host, grpc.WithTransportCredentials(creds)) }
		if conn, err = dial(); err != nil {
			return nil, fmt.Errorf("otlp grpc endpoint %q: %w", u, err)
		}
	}
	// The collector is dialled directly (no HTTP_PROXY: the sidecar's
	// own environment often points at itself).
	tr := &http.Transport{TLSClientConfig: tlsCfg.Clone(), ForceAttemptHTTP2: true, MaxIdleConns: 2, IdleConnTimeout: time.Minute}
	return &traceExporter{
		url:        u,
		conn:       conn,
		dial:       dial,
		tls:        x.TLS,
		log:        log,
		headers:    x.Headers,
		md:         md,
		timeout:    x.Timeout,
		gzip:       x.Compression == OTLPCompressionGzip,
		clock:      clock,
		maxPending: maxPendingSpans,
		// Each export's deadline, dial and handshake included, is its
		// context's, on the proxy's clock (withTimeout).
		// A redirect is not followed: net/http would carry the headers
		// (an API key) to wherever it points, plaintext http:// included.
		client: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
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
	if len(e.pending) >= e.maxPending {
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

// run exports on every tick until ctx ends, then once more within the
// export timeout.
func (e *traceExporter) run(ctx context.Context, tick <-chan time.Time) {
	for {
		select {
		case <-tick:
			e.flush(ctx)
		case <-ctx.Done():
			fctx, cancel := e.withTimeout(context.Background())
			e.flush(fctx)
			cancel()
			if e.conn != nil {
				e.conn.Close()
			}
			e.client.CloseIdleConnections()
			return
		}
	}
}

// withTimeout is context.WithTimeout on the proxy's clock.
func (e *traceExporter) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	t := e.clock.AfterFunc(e.timeout, cancel)
	return ctx, func() { t.Stop(); cancel() }
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

// export sends one ExportTraceServiceRequest. Its only field is
// `repeated ResourceSpans resource_spans = 1`, written here with protowire
// so that the collector service's package (and its gRPC gateway
// dependencies) need not be linked; over gRPC the same bytes go through
// rawCodec.
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
	if e.tls.reload(e.log) {
		e.renew()
	}
	ctx, cancel := e.withTimeout(ctx)
	defer cancel()
	if e.conn != nil {
		// Not WaitForReady: a collector refusing connections fails the
		// batch at once instead of holding the exporter for the timeout.
		if len(e.md) > 0 {
			ctx = metadata.NewOutgoingContext(ctx, e.md)
		}
		opts := []grpc.CallOption{grpc.ForceCodecV2(rawCodec{})}
		if e.gzip {
			opts = append(opts, grpc.UseCompressor(grpcgzip.Name))
		}
		var reply []byte
		return e.conn.Invoke(ctx, otlpExportMethod, &body, &reply, opts...)
	}
	if e.gzip {
		if body, err = e.compress(body); err != nil {
			return err
		}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	for k, v := range e.headers {
		req.Header.Set(k, v)
	}
	req.Header.Set("Content-Type", "application/x-protobuf")
	if e.gzip {
		req.Header.Set("Content-Encoding", "gzip")
	}
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

// compress gzips an HTTP body with the exporter's compressor. The output
// is a new buffer, not one kept between exports: net/http may still read
// a request body after Do returns.
func (e *traceExporter) compress(body []byte) ([]byte, error) {
	out := bytes.NewBuffer(make([]byte, 0, len(body)/4+64))
	if e.gz == nil {
		e.gz, _ = gzip.NewWriterLevel(out, otlpGzipLevel)
	} else {
		e.gz.Reset(out)
	}
	if _, err := e.gz.Write(body); err != nil {
		return nil, err
	}
	if err := e.gz.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// renew drops the collector connections made with the previous TLS
// material, so that a rotated certificate is used from the next export
// on, not only once a connection breaks. (Only the exporter's goroutine
// uses conn.)
func (e *traceExporter) renew() {
	e.client.CloseIdleConnections()
	if e.conn == nil {
		return
	}
	conn, err := e.dial()
	if err != nil {
		e.log.Error("otlp grpc: reconnect after the tls reload", "error", err)
		return
	}
	e.conn.Close()
	e.conn = conn
}

// rawCodec passes already-encoded protobuf through gRPC. Its name is
// "proto", so the collector decodes with its usual codec.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return mem.BufferSlice{mem.SliceBuffer(*b)}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "proto" }
