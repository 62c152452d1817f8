package proxy

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
)

// Authorization results in metrics and logs. Outbound requests are
// authorized by the peer's inbound proxy; the outbound side checks only the
// peer's SPIFFE ID during the handshake.
const (
	authzAllow = "allow"
	authzDeny  = "deny"
	authzNone  = "none"
)

// metrics are the proxy's Prometheus series. Label values come from SPIFFE
// IDs, configured service names, and status codes, never from request
// paths or headers.
type metrics struct {
	requests        *prometheus.CounterVec
	duration        *prometheus.HistogramVec
	tcpConns        *prometheus.CounterVec
	tcpSent         *prometheus.CounterVec
	tcpRecv         *prometheus.CounterVec
	retries         *prometheus.CounterVec
	overflows       *prometheus.CounterVec
	cxOverflows     *prometheus.CounterVec
	ejections       *prometheus.CounterVec
	faults          *prometheus.CounterVec
	mirrors         *prometheus.CounterVec
	healthChanges   *prometheus.CounterVec
	handshakeErrors *prometheus.CounterVec
	heldBytes       prometheus.Gauge
	heldOverflows   prometheus.Counter
	downstreamGone  *prometheus.CounterVec

	// series caches the request series per label set, so that a request
	// costs no label hashing or vector lookups. Series are never deleted
	// from the vectors, so a cached child stays the registered one.
	seriesMu sync.RWMutex
	series   map[[6]string]reqSeries
}

type reqSeries struct {
	count prometheus.Counter
	dur   prometheus.Observer
}

// maxCachedSeries bounds the cache; label sets past it are looked up in
// the vectors each time.
const maxCachedSeries = 4096

func (m *metrics) requestSeries(labels [6]string) reqSeries {
	m.seriesMu.RLock()
	s, ok := m.series[labels]
	m.seriesMu.RUnlock()
	if ok {
		return s
	}
	s = reqSeries{count: m.requests.WithLabelValues(labels[:]...), dur: m.duration.WithLabelValues(labels[:]...)}
	m.seriesMu.Lock()
	if len(m.series) < maxCachedSeries {
		m.series[labels] = s
	}
	m.seriesMu.Unlock()
	return s
}

var reqLabels = []string{"direction", "source_workload", "source_namespace", "destination_service", "response_code", "authz_result"}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	tcpLabels := []string{"direction", "source_workload", "source_namespace", "destination_service", "authz_result"}
	m := &metrics{
		series: map[[6]string]reqSeries{},
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_requests_total", Help: "HTTP requests through the proxy.",
		}, reqLabels),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "writ_request_duration_seconds", Help: "Time from a request's arrival at the proxy to the end of its response.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, reqLabels),
		tcpConns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_tcp_connections_total", Help: "Opaque TCP connections through the proxy, counted when authorized or refused.",
		}, tcpLabels),
		tcpSent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_tcp_sent_bytes_total", Help: "Bytes sent to the connection's accepting side's peer (downstream to upstream).",
		}, []string{"direction", "destination_service"}),
		tcpRecv: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_tcp_received_bytes_total", Help: "Bytes received from upstream and sent back downstream.",
		}, []string{"direction", "destination_service"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_upstream_retries_total", Help: "Request retries by cluster.",
		}, []string{"cluster"}),
		overflows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_upstream_overflow_total", Help: "Requests refused (503) by a cluster's circuit breaker, by breaker (max_requests, max_pending_requests).",
		}, []string{"cluster", "breaker"}),
		cxOverflows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_upstream_connection_overflow_total", Help: "Connections not opened because the cluster was at max_connections (the request waited for one or was refused).",
		}, []string{"cluster"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_upstream_ejections_total", Help: "Endpoints ejected by outlier detection, by detector (consecutive_5xx, consecutive_gateway_failure, success_rate, failure_percentage).",
		}, []string{"cluster", "detector"}),
		faults: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_fault_injections_total", Help: "Injected faults by kind (delay, abort).",
		}, []string{"kind"}),
		mirrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_mirrored_requests_total", Help: "Request copies sent to mirror clusters, by the shadow's response code (or error, dropped, too_large: a body over 64 KiB).",
		}, []string{"cluster", "result"}),
		healthChanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_upstream_health_changes_total", Help: "Endpoints leaving (unhealthy) or rejoining (healthy) the pool by active health check.",
		}, []string{"cluster", "to"}),
		handshakeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_tls_handshake_errors_total", Help: "Failed mTLS handshakes (no or untrusted peer SVID, wrong peer ID).",
		}, []string{"direction"}),
		heldBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "writ_held_body_bytes", Help: "Bytes of request bodies held for their policy check now, all requests together (bounded by --max-held-body-bytes-total).",
		}),
		heldOverflows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "writ_held_body_overflow_total", Help: "Requests answered 503 because holding their body for the policy check would exceed --max-held-body-bytes-total.",
		}),
		downstreamGone: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_downstream_gone_total", Help: "HTTP/1.1 requests cancelled because their client closed its connection while waiting for the answer (noticed once a request has waited --watch-client-after, 500 ms by default).",
		}, []string{"direction"}),
	}
	for i, c := range m.collectors() {
		if err := reg.Register(c); err != nil {
			for _, r := range m.collectors()[:i] {
				reg.Unregister(r)
			}
			return nil, fmt.Errorf("register proxy metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.duration, m.tcpConns, m.tcpSent, m.tcpRecv, m.retries, m.overflows, m.cxOverflows, m.ejections, m.faults, m.mirrors, m.healthChanges, m.handshakeErrors, m.heldBytes, m.heldOverflows, m.downstreamGone}
}

// unregister takes the metrics off reg again, so that a proxy that failed
// to start does not keep a later one from registering.
func (m *metrics) unregister(reg prometheus.Registerer) {
	for _, c := range m.collectors() {
		reg.Unregister(c)
	}
}

// reqLog is one request's or connection's facts for metrics and the
// access log.
type reqLog struct {
	direction, method, path, proto string
	source, srcNS, srcWL, dest     string
	authz, decisionID, traceID     string
	span                           spanCtx
	status                         int
	bytes, sent, recv              int64
	dur                            time.Duration
}

var statusText [600]string

func init() {
	for i := range statusText {
		statusText[i] = strconv.Itoa(i)
	}
}

func codeLabel(c int) string {
	if c >= 0 && c < len(statusText) {
		return statusText[c]
	}
	return strconv.Itoa(c)
}

func (p *Proxy) observe(r *reqLog) {
	s := p.metrics.requestSeries([6]string{r.direction, r.srcWL, r.srcNS, r.dest, codeLabel(r.status), r.authz})
	s.count.Inc()
	s.dur.Observe(r.dur.Seconds())
	now := p.clock.Now()
	p.alog.write(r, now)
	if p.traces != nil && r.span.sampled {
		p.traces.record(r, now)
	}
}

// countTCP counts a connection once it is authorized or refused.
func (p *Proxy) countTCP(r *reqLog) {
	p.metrics.tcpConns.WithLabelValues(r.direction, r.srcWL, r.srcNS, r.dest, r.authz).Inc()
}

// observeTCP records a connection's end.
func (p *Proxy) observeTCP(r *reqLog) {
	p.metrics.tcpSent.WithLabelValues(r.direction, r.dest).Add(float64(r.sent))
	p.metrics.tcpRecv.WithLabelValues(r.direction, r.dest).Add(float64(r.recv))
	p.alog.write(r, p.clock.Now())
}

// accessLog writes one JSON object per line into a buffer that Run
// flushes every accessLogFlush and when full, so that logging costs no
// system call per request. Safe for concurrent use.
type accessLog struct {
	mu  sync.Mutex
	w   io.Writer
	out *bufio.Writer
	buf []byte
}

const accessLogFlush = 200 * time.Millisecond

// newAccessLog buffers for w; with the log off (io.Discard) there is
// nothing to buffer, so the 64 KiB buffer is not kept live for nothing.
func newAccessLog(w io.Writer) *accessLog {
	if w == io.Discard {
		return &accessLog{w: w}
	}
	return &accessLog{w: w, out: bufio.NewWriterSize(w, 64<<10)}
}

func (a *accessLog) flush() {
	if a.out == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	_ = a.out.Flush()
}

func (a *accessLog) write(r *reqLog, now time.Time) {
	if a.w == io.Discard {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.buf[:0]
	b = append(b, `{"time":"`...)
	b = now.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	b = jsonField(b, "direction", r.direction)
	b = jsonField(b, "protocol", r.proto)
	if r.method != "" {
		b = jsonField(b, "method", r.method)
		b = jsonField(b, "path", r.path)
	}
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(r.status), 10)
	b = jsonField(b, "source", r.source)
	b = jsonField(b, "destination_service", r.dest)
	b = jsonField(b, "authz", r.authz)
	b = jsonField(b, "decision_id", r.decisionID)
	b = jsonField(b, "trace_id", r.traceID)
	b = append(b, `,"duration_ms":`...)
	b = strconv.AppendFloat(b, float64(r.dur.Microseconds())/1000, 'f', 3, 64)
	if r.proto == "tcp" {
		b = append(b, `,"bytes_sent":`...)
		b = strconv.AppendInt(b, r.sent, 10)
		b = append(b, `,"bytes_received":`...)
		b = strconv.AppendInt(b, r.recv, 10)
	} else {
		b = append(b, `,"response_bytes":`...)
		b = strconv.AppendInt(b, r.bytes, 10)
	}
	b = append(b, "}\n"...)
	_, _ = a.out.Write(b)
	a.buf = b
}

const hexDigits = "0123456789abcdef"

// jsonField appends ,"k":"v" with v escaped as JSON.
func jsonField(b []byte, k, v string) []byte {
	b = append(b, `,"`...)
	b = append(b, k...)
	b = append(b, `":"`...)
	for i := 0; i < len(v); {
		c := v[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			b = append(b, c)
			i++
			continue
		}
		if c < utf8.RuneSelf {
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(v[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, v[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}

// spanCtx is one proxy hop's span: W3C trace and span ids in hex, its
// parent's span id when the request came with a traceparent, and whether
// the trace is sampled (exported).
type spanCtx struct {
	traceID, spanID, parentID string
	sampled                   bool
}

// startSpan gives the request a span of this hop: the traceparent it
// carries onward names the new span, whose parent is the span the request
// arrived with (the app's outbound, the calling sidecar's inbound).
func startSpan(h http.Header, s *TraceSampler) spanCtx {
	var parent string
	if tp := h.Get(headerTraceparent); len(tp) == 55 {
		if _, ok := validTraceparent(tp); ok {
			parent = tp[36:52]
		}
	}
	id := ensureTrace(h, true, s)
	tp := h.Get(headerTraceparent)
	return spanCtx{traceID: id, spanID: tp[36:52], parentID: parent, sampled: sampledFlag(tp[54])}
}

// sampledFlag reports the sampled bit (the lowest) of trace-flags, given
// the flags' second hex digit.
func sampledFlag(c byte) bool {
	if c >= 'a' {
		c -= 'a' - 10
	}
	return c&1 == 1
}

// ensureTrace makes sure the request carries a W3C traceparent and returns
// its trace id. A valid one keeps its trace id; the outbound side starts a
// new span under it, as a hop of the trace. A missing or malformed one is
// replaced by a new trace, sampled as s decides.
func ensureTrace(h http.Header, newSpan bool, s *TraceSampler) string {
	tp := h.Get(headerTraceparent)
	if id, ok := validTraceparent(tp); ok {
		if newSpan {
			var b [55]byte
			copy(b[:], tp[:36])
			writeSpanID(b[:])
			b[52], b[53], b[54] = '-', tp[53], tp[54]
			setOne(h, headerTraceparent, string(b[:]))
		}
		return id
	}
	var b [55]byte
	b[0], b[1], b[2] = '0', '0', '-'
	var id [16]byte
	for id == [16]byte{} {
		putUint64(id[:8], rand.Uint64())
		putUint64(id[8:], rand.Uint64())
	}
	hex.Encode(b[3:35], id[:])
	b[35] = '-'
	writeSpanID(b[:])
	b[52], b[53], b[54] = '-', '0', '0'
	if s.sampleRoot() {
		b[54] = '1'
	}
	tp = string(b[:])
	setOne(h, headerTraceparent, tp)
	return tp[3:35]
}

// setOne sets a canonical header to one value, reusing its slice.
func setOne(h http.Header, k, v string) {
	if vv := h[k]; len(vv) == 1 {
		vv[0] = v
		return
	}
	h[k] = []string{v}
}

func writeSpanID(b []byte) {
	var span [8]byte
	for span == [8]byte{} {
		putUint64(span[:], rand.Uint64())
	}
	hex.Encode(b[36:52], span[:])
}

func putUint64(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (8 * i))
	}
}

// validTraceparent checks version 00 traceparent syntax.
func validTraceparent(tp string) (string, bool) {
	if len(tp) != 55 || tp[0:3] != "00-" || tp[35] != '-' || tp[52] != '-' {
		return "", false
	}
	zero := true
	for i, c := range []byte(tp) {
		if i == 2 || i == 35 || i == 52 {
			continue
		}
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return "", false
		}
		if i > 2 && i < 35 && c != '0' {
			zero = false
		}
	}
	if zero || tp[36:52] == "0000000000000000" {
		return "", false
	}
	return tp[3:35], true
}

// recorder notes the status and size of a response. It unwraps to the
// underlying writer, so flushing (streaming, gRPC) and trailers pass
// through.
type recorder struct {
	http.ResponseWriter
	code int
	n    int64
}

var recorderPool = sync.Pool{New: func() any { return new(recorder) }}

func newRecorder(w http.ResponseWriter) *recorder {
	r := recorderPool.Get().(*recorder)
	r.ResponseWriter, r.code, r.n = w, 0, 0
	return r
}

func (r *recorder) release() {
	r.ResponseWriter = nil
	recorderPool.Put(r)
}

func (r *recorder) WriteHeader(code int) {
	if r.code == 0 && code >= 200 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.n += int64(n)
	return n, err
}

func (r *recorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) status() int {
	if r.code == 0 {
		return http.StatusOK
	}
	return r.code
}

// bufPool lends 32 KiB copy buffers to the reverse proxies and to TCP
// splicing, so that no request allocates its own. It is a bounded free
// list rather than a sync.Pool: ReverseProxy's BufferPool hands back bare
// slices, and putting one in a sync.Pool would allocate a box each time.
var bufPool = &bytePool{free: make(chan []byte, 256)}

const bufSize = 32 << 10

type bytePool struct{ free chan []byte }

func (bp *bytePool) Get() []byte {
	select {
	case b := <-bp.free:
		return b
	default:
		return make([]byte, bufSize)
	}
}

func (bp *bytePool) Put(b []byte) {
	if cap(b) < bufSize {
		return
	}
	select {
	case bp.free <- b[:bufSize]:
	default:
	}
}

// splice copies both ways until both directions end, half-closing where
// the connection allows, and returns the bytes each way.
func (p *Proxy) splice(down, up net.Conn) (sent, recv int64) {
	untrack := p.trackTCP(down, up)
	defer untrack()
	var wg sync.WaitGroup
	wg.Go(func() {
		sent = copyHalf(up, down)
	})
	recv = copyHalf(down, up)
	wg.Wait()
	down.Close()
	up.Close()
	return sent, recv
}

type closeWriter interface{ CloseWrite() error }

func copyHalf(dst, src net.Conn) int64 {
	buf := bufPool.Get()
	defer bufPool.Put(buf)
	n, err := io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, buf)
	if cw, ok := dst.(closeWriter); ok && err == nil {
		_ = cw.CloseWrite()
	} else {
		dst.Close()
	}
	return n
}

// connListener hands already-authenticated connections to an http.Server.
type connListener struct {
	addr   net.Addr
	ch     chan net.Conn
	mu     sync.Mutex
	closed bool
	done   chan struct{}
}

func newConnListener(addr net.Addr) *connListener {
	return &connListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

// push offers c to the server; false when the listener is closed.
func (l *connListener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		close(l.done)
	}
	return nil
}

func (l *connListener) Addr() net.Addr { return l.addr }

type atomicCounter = atomic.Int64
