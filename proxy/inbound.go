package proxy

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/enforcer"
)

// Header names the proxy owns.
const (
	headerXFCC        = "X-Forwarded-Client-Cert"
	headerTraceparent = "Traceparent"
)

// inboundListener is one mesh port. Every connection is a TLS handshake
// requiring a client SVID of the trust domain; ALPN then decides whether
// it carries HTTP (h2, http/1.1) or opaque TCP (no ALPN).
type inboundListener struct {
	p *Proxy
	// enf decides the listener's requests (nil: deny all). Rebind swaps
	// it when a policy reload changes what its binding resolves to.
	enf    atomic.Pointer[enforcer.Enforcer]
	cfg    Inbound
	ln     net.Listener
	tlsCfg *tls.Config
	httpLn *connListener
	srv    *http.Server
	h1     *h1Server
	fwd    *forwarder
	toApp  appTransport
	ctx    context.Context
	cancel context.CancelFunc
	// ext is the CheckRequests' context extensions (read-only).
	ext map[string]string
	// next is the listener that replaced this one in an Update, for the
	// same service. Its connections drain, but the requests they still
	// carry are served under the new listener's configuration: a policy
	// change (dry run to enforce, another decision) holds from the moment
	// Update returns, not only for connections made after it.
	next atomic.Pointer[inboundListener]
}

// peerKey carries the connection's verified peer into its requests.
type peerKey struct{}

// peerInfo is what the proxy knows of a connection's peer, computed once
// per connection.
type peerInfo struct {
	id        string
	namespace string
	workload  string
	xfcc      string
	addr      string
	port      uint32
	local     string
	localPort uint32
	source    *authv3.AttributeContext_Peer
	dest      *authv3.AttributeContext_Peer
}

func (p *Proxy) newInbound(cfg Inbound) (*inboundListener, error) {
	enf, err := p.inboundEnforcer(cfg)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("inbound %s: %w", cfg.Name, err)
	}
	ext := map[string]string{enforcer.ServiceContextKey: cfg.Service}
	if cfg.AuthzMode != "" {
		// The enforcer honours the mode (dry-run: never deny); policies
		// may read both.
		ext[enforcer.ModeContextKey] = cfg.AuthzMode
	}
	if cfg.AuthzDecision != "" {
		ext[enforcer.DecisionContextKey] = cfg.AuthzDecision
	}
	if cfg.AuthzDryRun != "" {
		ext[enforcer.DryRunContextKey] = cfg.AuthzDryRun
	}
	l := &inboundListener{p: p, cfg: cfg, ln: ln, httpLn: newConnListener(ln.Addr()), ext: ext}
	l.enf.Store(enf)
	l.ctx, l.cancel = context.WithCancel(context.Background())
	l.tlsCfg = svidtls.ServerConfig(p.src, p.src, svidtls.AuthorizeMemberOf(p.td), p.clock)
	l.tlsCfg.NextProtos = []string{"h2", "http/1.1"}
	l.toApp = newAppTransport(cfg.AppProtocol == "h2c")
	l.fwd = newForwarder(l.toApp, "http", cfg.App)
	l.srv = &http.Server{
		Handler:           l,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if pc, ok := c.(*peekedConn); ok {
				// Handed over by the fast path (h1Server).
				c = pc.Conn
			}
			if tc, ok := c.(*tls.Conn); ok {
				return context.WithValue(ctx, peerKey{}, l.peer(tc))
			}
			return ctx
		},
	}
	l.h1 = newH1Server(l, l.httpLn, func(c net.Conn) context.Context {
		return context.WithValue(context.Background(), peerKey{}, l.peer(c.(*tls.Conn)))
	})
	l.h1.logPanic = func(v any) { p.log.Error("http handler panic", "listener", cfg.Name, "panic", fmt.Sprint(v)) }
	l.h1.watchAfter, l.h1.gone = p.watchAfter, p.metrics.downstreamGone.WithLabelValues("inbound")
	return l, nil
}

// peer describes a connection's verified peer, with the XFCC value in
// Envoy's format (By, Hash, URI).
func (l *inboundListener) peer(c *tls.Conn) *peerInfo {
	st := c.ConnectionState()
	pi := &peerInfo{}
	if ra, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		pi.addr, pi.port = ra.IP.String(), uint32(ra.Port)
	}
	if la, ok := c.LocalAddr().(*net.TCPAddr); ok {
		pi.local, pi.localPort = la.IP.String(), uint32(la.Port)
	}
	id, err := svidtls.PeerID(st)
	if err != nil {
		return pi
	}
	pi.id = id.String()
	// The peers of every request on this connection: built once, shared
	// read-only by the requests' CheckRequests.
	// The certificate is there as Envoy's include_peer_certificate puts
	// it, so that decisions record its expiry (audit: expired
	// certificates seen in use).
	pi.source = &authv3.AttributeContext_Peer{Principal: pi.id, Address: sockAddr(pi.addr, pi.port),
		Certificate: enforcer.PeerCertificate(st.PeerCertificates[0])}
	pi.dest = &authv3.AttributeContext_Peer{Principal: l.p.selfID().String(), Address: sockAddr(pi.local, pi.localPort), Service: l.cfg.Service}
	pi.namespace, pi.workload = workloadParts(id)
	sum := sha256.Sum256(st.PeerCertificates[0].Raw)
	pi.xfcc = "By=" + l.p.selfID().String() + ";Hash=" + hex.EncodeToString(sum[:]) + ";URI=" + pi.id
	return pi
}

// workloadParts splits spiffe://td/ns/NS/sa/SA into NS and SA.
func workloadParts(id spiffeid.ID) (ns, sa string) {
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) == 4 && segs[0] == "ns" && segs[2] == "sa" {
		return segs[1], segs[3]
	}
	return "", id.Path()
}

func (l *inboundListener) serve() error {
	go func() { _ = l.srv.Serve(l.httpLn) }()
	return l.p.acceptLoop(l.ln, "inbound", l.cfg.Name, l.handshake)
}

// handshake authenticates a connection and hands it to HTTP or TCP.
func (l *inboundListener) handshake(c net.Conn) {
	tc := tls.Server(c, l.tlsCfg)
	if err := tlsHandshake(l.ctx, tc); err != nil {
		l.p.metrics.handshakeErrors.WithLabelValues("inbound").Inc()
		l.p.log.Debug("inbound handshake failed", "listener", l.cfg.Name, "remote", c.RemoteAddr().String(), "error", err)
		c.Close()
		return
	}
	switch tc.ConnectionState().NegotiatedProtocol {
	case "http/1.1":
		l.h1.serveConn(tc)
	case "h2":
		if !l.httpLn.push(tc) {
			tc.Close()
		}
	default:
		l.serveTCP(tc)
	}
}

func (l *inboundListener) shutdown(ctx context.Context) {
	l.ln.Close()
	l.cancel()
	l.h1.shutdown(ctx)
	if err := l.srv.Shutdown(ctx); err != nil {
		l.srv.Close()
	}
}

// ServeHTTP authorizes one request and forwards it to the app.
func (l *inboundListener) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if n := l.next.Load(); n != nil {
		n.ServeHTTP(w, r)
		return
	}
	start := l.p.clock.Now()
	pi, _ := r.Context().Value(peerKey{}).(*peerInfo)
	if pi == nil || pi.id == "" {
		http.Error(w, "no verified peer", http.StatusForbidden)
		return
	}
	stripIdentityHeaders(r.Header)
	span := startSpan(r.Header, l.p.sampler)
	rw := newRecorder(w)
	defer rw.release()
	res := reqLog{direction: "inbound", method: r.Method, path: r.URL.Path, proto: r.Proto,
		source: pi.id, srcNS: pi.namespace, srcWL: pi.workload, dest: l.cfg.Service, traceID: span.traceID, span: span, authz: authzDeny}

	held, err := l.holdBody(rw, r)
	if err != nil {
		// Refused before any check, as Envoy's 413 or 408 (or for want
		// of room to hold it, 503): no decision.
		writeBodyRefused(rw, err)
		res.authz = authzNone
		res.status, res.bytes, res.dur = rw.status(), rw.n, l.p.clock.Since(start)
		l.p.observe(&res)
		return
	}
	// The held bytes are replayed to the app, so they stay taken until
	// the request ends, however it ends.
	defer held.release()
	resp, d := l.check(r, pi, held)
	res.decisionID = d.ID
	if d.Result != enforcer.ResultAllow {
		writeDenied(rw, resp, d)
	} else {
		res.authz = authzAllow
		ok := resp.GetOkResponse()
		for _, h := range ok.GetHeaders() {
			applyHeader(r.Header, h)
		}
		for _, name := range ok.GetHeadersToRemove() {
			r.Header.Del(name)
		}
		for _, h := range ok.GetResponseHeadersToAdd() {
			applyHeader(rw.Header(), h)
		}
		r.Header.Set(headerXFCC, pi.xfcc)
		l.fwd.serve(r.Context(), rw, r, !l.toApp.allH2C)
	}
	res.status, res.bytes, res.dur = rw.status(), rw.n, l.p.clock.Since(start)
	l.p.observe(&res)
}

// check asks the enforcer, denying when there is none.
func (l *inboundListener) check(r *http.Request, pi *peerInfo, held *heldBody) (*authv3.CheckResponse, enforcer.Decision) {
	enf := l.enf.Load()
	if enf == nil {
		return nil, enforcer.Decision{Result: enforcer.ResultDeny, HTTPStatus: http.StatusForbidden, Reason: "no policy loaded"}
	}
	req := l.checkRequest(r, pi)
	held.attach(req)
	return enf.Check(r.Context(), req)
}

// partialBodyKey is enforcer.PartialBodyHeader as r.Header spells it.
const partialBodyKey = "X-Envoy-Auth-Partial-Body"

// checkRequest describes r the way Envoy's ext_authz filter does:
// lower-case header names (joined with ","), pseudo-headers included.
func (l *inboundListener) checkRequest(r *http.Request, pi *peerInfo) *authv3.CheckRequest {
	headers := make(map[string]string, len(r.Header)+4)
	for k, vs := range r.Header {
		if k == partialBodyKey {
			// Only the proxy says whether a body is whole; Envoy too
			// drops the client's, body or not.
			continue
		}
		headers[lowerHeader(k)] = strings.Join(vs, ",")
	}
	target := r.URL.RequestURI()
	headers[":method"], headers[":path"], headers[":authority"], headers[":scheme"] = r.Method, target, r.Host, "https"
	c := new(checkReq)
	c.http.Method, c.http.Path, c.http.Host, c.http.Scheme, c.http.Protocol, c.http.Headers = r.Method, target, r.Host, "https", r.Proto, headers
	c.req.Http = &c.http
	c.attrs.Source, c.attrs.Destination, c.attrs.Request, c.attrs.ContextExtensions = pi.source, pi.dest, &c.req, l.ext
	c.check.Attributes = &c.attrs
	return &c.check
}

// checkReq is a CheckRequest and the messages it points to, made in one
// allocation (never copied: the messages are built in place).
type checkReq struct {
	check authv3.CheckRequest
	attrs authv3.AttributeContext
	req   authv3.AttributeContext_Request
	http  authv3.AttributeContext_HttpRequest
}

func sockAddr(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

// lowerHeader lower-cases canonical header names, allocating only for
// names not seen before.
func lowerHeader(k string) string {
	if v, ok := lowerNames.Load(k); ok {
		return v.(string)
	}
	low := strings.ToLower(k)
	if lowerNamesN.Add(1) < 4096 {
		lowerNames.Store(k, low)
	}
	return low
}

var (
	lowerNames  sync.Map
	lowerNamesN atomicCounter
)

// stripIdentityHeaders removes headers that claim identity from outside:
// only the proxy sets them, from the verified peer.
func stripIdentityHeaders(h http.Header) {
	for k := range h {
		if len(k) >= 7 && strings.EqualFold(k[:7], "x-writ-") || k == headerXFCC {
			delete(h, k)
		}
	}
}

// writeDenied sends the enforcer's denial: its status, headers and body.
func writeDenied(w http.ResponseWriter, resp *authv3.CheckResponse, d enforcer.Decision) {
	status := d.HTTPStatus
	body := ""
	if den := resp.GetDeniedResponse(); den != nil {
		if s := int(den.GetStatus().GetCode()); s >= 200 && s <= 599 {
			status = s
		}
		for _, h := range den.GetHeaders() {
			applyHeader(w.Header(), h)
		}
		body = den.GetBody()
	}
	if status < 400 || status > 599 {
		status = http.StatusForbidden
	}
	if body == "" {
		body = http.StatusText(status) + "\n"
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	}
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(body))
}

// applyHeader adds or sets a header as Envoy's HeaderValueOption says
// (append when asked, else overwrite).
func applyHeader(h http.Header, o *corev3.HeaderValueOption) {
	k, v := o.GetHeader().GetKey(), o.GetHeader().GetValue()
	if k == "" || strings.HasPrefix(k, ":") {
		return
	}
	if o.GetAppend().GetValue() || o.GetAppendAction() == corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD {
		h.Add(k, v)
		return
	}
	h.Set(k, v)
}

// serveTCP authorizes a connection once and splices it to the app.
func (l *inboundListener) serveTCP(tc *tls.Conn) {
	start := l.p.clock.Now()
	pi := l.peer(tc)
	res := reqLog{direction: "inbound", proto: "tcp", source: pi.id, srcNS: pi.namespace, srcWL: pi.workload, dest: l.cfg.Service, authz: authzDeny}
	defer func() {
		res.dur = l.p.clock.Since(start)
		l.p.observeTCP(&res)
	}()
	if pi.id == "" {
		l.p.countTCP(&res)
		tc.Close()
		return
	}
	var d enforcer.Decision
	if enf := l.enf.Load(); enf == nil {
		d.Result = enforcer.ResultDeny
	} else {
		_, d = enf.Check(l.ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Source: pi.source, Destination: pi.dest, ContextExtensions: l.ext,
		}})
	}
	res.decisionID = d.ID
	if d.Result == enforcer.ResultAllow {
		res.authz = authzAllow
	}
	l.p.countTCP(&res)
	if d.Result != enforcer.ResultAllow {
		tc.Close()
		return
	}
	app, err := net.DialTimeout("tcp", l.cfg.App, defaultConnectTimeout)
	if err != nil {
		res.status = 503
		l.p.log.Warn("inbound tcp: dial app", "listener", l.cfg.Name, "error", err)
		tc.Close()
		return
	}
	res.sent, res.recv = l.p.splice(tc, app)
}

// appTransport forwards to the local app over pooled connections: HTTP/1.1
// by default, h2c for gRPC and when the app speaks it.
type appTransport struct {
	h1     *h1Transport
	h2c    *http.Transport
	allH2C bool
}

func newAppTransport(allH2C bool) appTransport {
	dialer := &net.Dialer{Timeout: defaultConnectTimeout}
	h1 := &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	h2c := &http.Transport{
		DialContext:        (&net.Dialer{Timeout: defaultConnectTimeout}).DialContext,
		IdleConnTimeout:    90 * time.Second,
		DisableCompression: true,
	}
	h2c.Protocols = new(http.Protocols)
	h2c.Protocols.SetUnencryptedHTTP2(true)
	return appTransport{h1: newH1Transport(h1, nil, dialer, nil), h2c: h2c, allH2C: allH2C}
}

// RoundTrip picks the transport.
func (t appTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if t.allH2C || (r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")) {
		return t.h2c.RoundTrip(r)
	}
	return t.h1.RoundTrip(r)
}

// proxyError answers a failed forward as Envoy would: 504 on a timeout,
// 503 when no upstream could be reached.
func proxyError(w http.ResponseWriter, r *http.Request, err error) {
	status := http.StatusServiceUnavailable
	msg := "upstream connect error or disconnect/reset before headers\n"
	switch {
	case errors.Is(err, errOverflow):
		overloaded(w)
		return
	case errors.Is(err, context.DeadlineExceeded):
		status, msg = http.StatusGatewayTimeout, "upstream request timeout\n"
	case errors.Is(err, errNoRoute):
		status, msg = http.StatusNotFound, "no route\n"
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		status, msg = 499, "client closed request\n"
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(msg))
}

// overloaded answers a request a circuit breaker refused as Envoy does:
// 503 with x-envoy-overloaded (and Writ's own X-Writ-Overloaded).
func overloaded(w http.ResponseWriter) {
	h := w.Header()
	h.Set("X-Envoy-Overloaded", "true")
	h.Set("X-Writ-Overloaded", "true")
	h.Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusServiceUnavailable)
	_, _ = io.WriteString(w, "upstream overflow\n")
}
