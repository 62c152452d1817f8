package proxy

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/stats"
	"google.golang.org/protobuf/proto"
)

// grpcEncodings is a collector's stats handler: gRPC keeps grpc-encoding
// out of the incoming metadata, so the encoding of each request, and its
// size before and after decompression, are read from the server's own
// accounting of the RPC.
type grpcEncodings chan otlpHTTPRequest

type grpcEncodingKey struct{}

func (h grpcEncodings) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	return context.WithValue(ctx, grpcEncodingKey{}, &otlpHTTPRequest{})
}

func (h grpcEncodings) HandleRPC(ctx context.Context, s stats.RPCStats) {
	r := ctx.Value(grpcEncodingKey{}).(*otlpHTTPRequest)
	switch s := s.(type) {
	case *stats.InHeader:
		r.encoding = s.Compression
	case *stats.InPayload:
		r.wireBytes, r.bytes = s.CompressedLength, s.Length
	case *stats.End:
		h <- *r
	}
}

func (grpcEncodings) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (grpcEncodings) HandleConn(context.Context, stats.ConnStats)                       {}

// startEncodingCollector is an OTLP collector, over TLS requiring a
// client certificate when pki is set, reporting each export's encoding.
func startEncodingCollector(t *testing.T, protocol string, pki *otlpPKI) (string, <-chan *tracepb.Span, <-chan otlpHTTPRequest) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	scheme := "http://"
	spans := make(chan *tracepb.Span, 1000)
	reqs := make(chan otlpHTTPRequest, 10)
	if protocol == OTLPProtocolGRPC {
		opts := []grpc.ServerOption{grpc.StatsHandler(grpcEncodings(reqs))}
		if pki != nil {
			scheme = "https://"
			opts = append(opts, grpc.Creds(credentials.NewTLS(pki.serverTLS())))
		}
		srv := grpc.NewServer(opts...)
		collectorpb.RegisterTraceServiceServer(srv, &otlpGRPCReceiver{spans: spans, services: make(chan string, 10)})
		go srv.Serve(l)
		t.Cleanup(srv.Stop)
		return scheme + l.Addr().String(), spans, reqs
	}
	srv := &http.Server{Handler: otlpHTTPHandler(t, spans, reqs)}
	if pki != nil {
		scheme = "https://"
		cfg := pki.serverTLS()
		cfg.NextProtos = []string{"h2", "http/1.1"}
		l = tls.NewListener(l, cfg)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	target := scheme + l.Addr().String()
	if protocol == OTLPProtocolHTTP {
		target += "/v1/traces"
	}
	return target, spans, reqs
}

// gzipTestSpans are n distinct spans with the attributes a sidecar's
// spans carry.
func gzipTestSpans(n int) []*tracepb.Span {
	out := make([]*tracepb.Span, n)
	for i := range out {
		out[i] = &tracepb.Span{
			TraceId: fmt.Appendf(nil, "trace-%010d", i), SpanId: fmt.Appendf(nil, "s%07d", i), Name: "GET",
			Kind: tracepb.Span_SPAN_KIND_CLIENT, StartTimeUnixNano: uint64(i) * 1000, EndTimeUnixNano: uint64(i)*1000 + 250,
			Attributes: []*commonpb.KeyValue{
				strAttr("http.request.method", "GET"), strAttr("url.path", fmt.Sprintf("/orders/%d", i)),
				intAttr("http.response.status_code", 200), strAttr("writ.source", "spiffe://example.org/ns/demo/sa/client"),
			},
		}
	}
	return out
}

// TestOTLPExportGzip: for both transports, plaintext and over mTLS, a
// collector gets gzip (Content-Encoding: gzip over HTTP, grpc-encoding:
// gzip over gRPC, fewer bytes on the wire than decoded) when the
// compression is gzip, and identity otherwise, and decodes exactly the
// spans sent. Two exports in a row check the compressor kept between
// them starts each body afresh.
func TestOTLPExportGzip(t *testing.T) {
	pki := newOTLPPKI(t)
	mtls, err := OTLPTLSConfig(pki.caFile, pki.certFile, pki.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	want := gzipTestSpans(300)
	for _, protocol := range []string{OTLPProtocolHTTP, OTLPProtocolGRPC} {
		for _, secure := range []bool{false, true} {
			for _, compression := range []string{"", OTLPCompressionNone, OTLPCompressionGzip} {
				t.Run(fmt.Sprintf("%s/tls=%v/%q", protocol, secure, compression), func(t *testing.T) {
					var p *otlpPKI
					x := OTLPExport{Compression: compression}
					if secure {
						p, x.TLS = pki, mtls
					}
					target, spans, reqs := startEncodingCollector(t, protocol, p)
					e, err := newTraceExporter(target, protocol, "svc", x, clockwork.NewRealClock(), prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() {
						if e.conn != nil {
							e.conn.Close()
						}
						e.client.CloseIdleConnections()
					})
					wantEnc := ""
					if compression == OTLPCompressionGzip {
						wantEnc = "gzip"
					}
					var gz *gzip.Writer
					for i, batch := range [][]*tracepb.Span{want[:200], want[200:]} {
						if err := e.export(context.Background(), batch); err != nil {
							t.Fatalf("export: %v", err)
						}
						if i == 0 {
							gz = e.gz
						} else if e.gz != gz {
							t.Errorf("a new gzip.Writer for the second export")
						}
						var r otlpHTTPRequest
						select {
						case r = <-reqs:
						case <-time.After(10 * time.Second):
							t.Fatal("the collector reported no request")
						}
						if r.encoding != wantEnc {
							t.Errorf("encoding %q, want %q", r.encoding, wantEnc)
						}
						if compressed := r.wireBytes < r.bytes; compressed != (wantEnc == "gzip") || (wantEnc == "" && r.wireBytes != r.bytes) {
							t.Errorf("%d bytes on the wire for %d decoded (compression %q)", r.wireBytes, r.bytes, compression)
						}
						for i, w := range batch {
							if got := <-spans; !proto.Equal(got, w) {
								t.Fatalf("span %d: got %v, want %v", i, got, w)
							}
						}
					}
				})
			}
		}
	}
}

// TestOTLPExportBadCompression: an unknown compression is a start-up
// error naming it.
func TestOTLPExportBadCompression(t *testing.T) {
	ca := newTestCA(t)
	_, err := New(&Config{}, Options{Source: ca.source(t, "/ns/demo/sa/client"), OTLPTracesURL: "http://collector:4318/v1/traces", OTLP: OTLPExport{Compression: "zstd"}})
	if err == nil || err.Error() != `otlp compression "zstd": want gzip or none` {
		t.Errorf("compression zstd: %v", err)
	}
}

// BenchmarkOTLPGzip compresses one full batch (1,024 spans with random
// trace and span ids, as a sidecar's are) the way export does, with the
// exporter's kept compressor and, for comparison, a new one per batch
// and a kept one at gzip's default level; wire/raw is the compressed
// size over the protobuf's.
func BenchmarkOTLPGzip(b *testing.B) {
	spans := gzipTestSpans(maxExportBatch)
	rnd := rand.New(rand.NewPCG(1, 2))
	for _, s := range spans {
		for i := range s.TraceId[:16] {
			s.TraceId[i] = byte(rnd.Uint32())
		}
		for i := range s.SpanId[:8] {
			s.SpanId[i] = byte(rnd.Uint32())
		}
		s.TraceId, s.SpanId = s.TraceId[:16], s.SpanId[:8]
	}
	e, err := newTraceExporter("http://127.0.0.1:1/v1/traces", OTLPProtocolHTTP, "svc", OTLPExport{Compression: OTLPCompressionGzip}, clockwork.NewRealClock(), prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	raw, err := proto.Marshal(&tracepb.ResourceSpans{Resource: e.resource, ScopeSpans: []*tracepb.ScopeSpans{{Spans: spans}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Run("kept", func(b *testing.B) {
		b.ReportAllocs()
		var n int
		for b.Loop() {
			out, err := e.compress(raw)
			if err != nil {
				b.Fatal(err)
			}
			n = len(out)
		}
		b.ReportMetric(float64(n)/float64(len(raw)), "wire/raw")
	})
	for _, c := range []struct {
		name  string
		level int
		kept  bool
	}{{"new-per-batch", gzip.BestSpeed, false}, {"default-level-kept", gzip.DefaultCompression, true}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			zw, _ := gzip.NewWriterLevel(nil, c.level)
			var n int
			for b.Loop() {
				out := bytes.NewBuffer(make([]byte, 0, len(raw)/4+64))
				if c.kept {
					zw.Reset(out)
				} else {
					zw, _ = gzip.NewWriterLevel(out, c.level)
				}
				if _, err := zw.Write(raw); err != nil {
					b.Fatal(err)
				}
				if err := zw.Close(); err != nil {
					b.Fatal(err)
				}
				n = out.Len()
			}
			b.ReportMetric(float64(n)/float64(len(raw)), "wire/raw")
		})
	}
}
