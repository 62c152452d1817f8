// Package grpcauthz authorizes calls to proxyless gRPC servers with the
// same Rego policy, input and audit trail as writ-enforcer: server
// interceptors turn each call into the CheckRequest Envoy would have sent
// for it (peer SPIFFE ID from the mTLS handshake, the method as the HTTP/2
// path, metadata as headers) and decide it in process with an
// enforcer.Enforcer. grpc-go authorizes only through its RBAC filter; this
// is the way for policies RBAC cannot express.
//
// It imports enforcer and grpc; applications import it.
package grpcauthz

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/writmesh/writ/enforcer"
)

// Limits on what a call contributes to the input, so that a client cannot
// make the policy input large.
const (
	maxHeaderValues = 64
	maxHeaderBytes  = 64 << 10
)

// Options configure an Authorizer.
type Options struct {
	// Enforcer decides and records every call (its Sink sees one
	// enforcer.Decision per call, its Metrics count them).
	Enforcer *enforcer.Enforcer
	// ServerID is the server's own SPIFFE ID, the destination principal
	// (input.attributes.destination.principal, input.writ.destination).
	ServerID spiffeid.ID
	// Service names the destination service (input.writ.destination_service).
	Service string
	// Timeout bounds one decision (enforcer.DefaultCheckTimeout if zero).
	Timeout time.Duration
	// Bundle, if set, verifies client certificates the handshake did not
	// (svidtls.ServerConfig and go-spiffe's tlsconfig check them in a
	// callback, which leaves tls.ConnectionState.VerifiedChains empty).
	// Without it only a verified chain names the caller, as
	// internal/svidpeer has it, and a call without one is decided as
	// anonymous (no source principal), which policies deny.
	Bundle x509bundle.Source
	// Clock checks certificate validity (real time if nil).
	Clock clockwork.Clock
	// IncludeBody puts a unary call's request message, framed as on the
	// wire, into input.attributes.request.http.rawBody, so that an
	// Enforcer with ProtoDescriptors (protoregistry.GlobalFiles serves for
	// the server's own services) decodes it into input.parsed_body.
	// Streams are decided before any message arrives and carry none.
	IncludeBody bool
}

// Authorizer makes the interceptors. Safe for concurrent use.
type Authorizer struct {
	opts Options
	// verified caches, per leaf certificate of a connection (the same
	// *x509.Certificate for all its calls), the SPIFFE ID Bundle verified,
	// so that a connection's chain is checked once, not per call.
	verified sync.Map // *x509.Certificate -> spiffeid.ID
	cached   atomic.Int64
	pems     sync.Map // *x509.Certificate -> enforcer.PeerCertificate of it
	pemsN    atomic.Int64
}

// maxVerified bounds the verified-leaf cache; past it, chains are
// verified on every call.
const maxVerified = 4096

// New checks opts.
func New(opts Options) (*Authorizer, error) {
	if opts.Enforcer == nil {
		return nil, fmt.Errorf("grpcauthz: no enforcer")
	}
	if opts.Timeout <= 0 {
		opts.Timeout = enforcer.DefaultCheckTimeout
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	return &Authorizer{opts: opts}, nil
}

// UnaryServerInterceptor decides each unary call before its handler runs.
func (a *Authorizer) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		var body []byte
		if a.opts.IncludeBody {
			if m, ok := req.(proto.Message); ok {
				if b, err := proto.Marshal(m); err == nil {
					body = frame(b)
				}
			}
		}
		if err := a.authorize(ctx, info.FullMethod, body); err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
}

// StreamServerInterceptor decides each streaming call before its handler
// runs, on what is known when the stream opens.
func (a *Authorizer) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if err := a.authorize(ss.Context(), info.FullMethod, nil); err != nil {
			return err
		}
		return handler(srv, ss)
	}
}

// authorize decides one call: nil to go on, else the status to answer.
// Every failure denies.
func (a *Authorizer) authorize(ctx context.Context, method string, body []byte) error {
	req, err := a.checkRequest(ctx, method, body)
	if err != nil {
		return status.Error(codes.PermissionDenied, "not authorized")
	}
	dctx, cancel := context.WithTimeout(ctx, a.opts.Timeout)
	defer cancel()
	resp, d := a.opts.Enforcer.Check(dctx, req)
	switch code.Code(resp.GetStatus().GetCode()) {
	case code.Code_OK:
		return nil
	case code.Code_UNAVAILABLE:
		// The decision could not be recorded: the call may succeed later.
		return status.Error(codes.Unavailable, "authorization unavailable")
	default:
		if d.Cause == enforcer.CauseBadPath {
			return status.Error(codes.InvalidArgument, "bad method path")
		}
		return status.Error(codes.PermissionDenied, "not authorized")
	}
}

// checkRequest is the CheckRequest Envoy would send for the call: the peer
// as source (principal only from a verified SPIFFE certificate), this
// server as destination, POST of the method path over HTTP/2 with the
// metadata as headers.
func (a *Authorizer) checkRequest(ctx context.Context, method string, body []byte) (*authv3.CheckRequest, error) {
	src := &authv3.AttributeContext_Peer{}
	if p, ok := peer.FromContext(ctx); ok {
		src.Address = address(p.Addr)
		id, err := a.peerID(p.AuthInfo)
		if err != nil {
			return nil, err
		}
		src.Principal = id
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && id != "" && len(ti.State.PeerCertificates) > 0 {
			// As Envoy's include_peer_certificate: decisions record the
			// caller certificate's expiry (compliance: expired
			// certificates seen in use).
			src.Certificate = a.certificate(ti.State.PeerCertificates[0])
		}
	}
	headers := map[string]string{}
	md, _ := metadata.FromIncomingContext(ctx)
	size := 0
	for k, vs := range md {
		if len(vs) > maxHeaderValues {
			return nil, fmt.Errorf("header %s: %d values", k, len(vs))
		}
		k = strings.ToLower(k)
		if strings.HasSuffix(k, "-bin") {
			enc := make([]string, len(vs))
			for i, v := range vs {
				enc[i] = base64.RawStdEncoding.EncodeToString([]byte(v))
			}
			vs = enc
		}
		v := strings.Join(vs, ",")
		if size += len(k) + len(v); size > maxHeaderBytes {
			return nil, fmt.Errorf("headers over %d bytes", maxHeaderBytes)
		}
		headers[k] = v
	}
	// Pseudo-headers come from the call, never from metadata.
	authority := headers[":authority"]
	headers[":method"], headers[":path"], headers[":scheme"] = "POST", method, "https"
	if headers["content-type"] == "" {
		headers["content-type"] = "application/grpc"
	}
	h := &authv3.AttributeContext_HttpRequest{
		Method: "POST", Path: method, Host: authority, Scheme: "https", Protocol: "HTTP/2",
		Headers: headers, RawBody: body, Size: int64(len(body)),
	}
	if len(body) == 0 {
		h.Size = -1
	}
	dst := &authv3.AttributeContext_Peer{}
	if !a.opts.ServerID.IsZero() {
		dst.Principal = a.opts.ServerID.String()
	}
	attrs := &authv3.AttributeContext{
		Source: src, Destination: dst,
		Request: &authv3.AttributeContext_Request{Http: h},
	}
	if a.opts.Service != "" {
		attrs.ContextExtensions = map[string]string{enforcer.ServiceContextKey: a.opts.Service}
	}
	return &authv3.CheckRequest{Attributes: attrs}, nil
}

// certificate is leaf in the CheckRequest's form, encoded once per
// connection (its calls share the *x509.Certificate).
func (a *Authorizer) certificate(leaf *x509.Certificate) string {
	if v, ok := a.pems.Load(leaf); ok {
		return v.(string)
	}
	pem := enforcer.PeerCertificate(leaf)
	if a.pemsN.Add(1) <= maxVerified {
		a.pems.Store(leaf, pem)
	}
	return pem
}

// peerID is the caller's SPIFFE ID: the leaf of the chain the handshake
// verified, else (with Options.Bundle) of the chain the client sent,
// verified here; "" when neither. A verified certificate that names no
// SPIFFE ID, or a sent chain that does not verify, is an error: the call
// is refused rather than decided as anonymous.
func (a *Authorizer) peerID(ai credentials.AuthInfo) (string, error) {
	ti, ok := ai.(credentials.TLSInfo)
	if !ok {
		return "", nil
	}
	if vc := ti.State.VerifiedChains; len(vc) > 0 && len(vc[0]) > 0 {
		id, err := x509svid.IDFromCert(vc[0][0])
		if err != nil {
			return "", fmt.Errorf("client certificate: %w", err)
		}
		return id.String(), nil
	}
	certs := ti.State.PeerCertificates
	if a.opts.Bundle == nil || len(certs) == 0 {
		return "", nil
	}
	now := a.opts.Clock.Now()
	if now.After(certs[0].NotAfter) || now.Before(certs[0].NotBefore) {
		return "", fmt.Errorf("client certificate is not valid now")
	}
	if v, ok := a.verified.Load(certs[0]); ok {
		return v.(string), nil
	}
	id, _, err := x509svid.Verify(certs, a.opts.Bundle, x509svid.WithTime(now))
	if err != nil {
		return "", fmt.Errorf("client certificate: %w", err)
	}
	if a.cached.Add(1) <= maxVerified {
		a.verified.Store(certs[0], id.String())
	}
	return id.String(), nil
}

func address(a net.Addr) *corev3.Address {
	tcp, ok := a.(*net.TCPAddr)
	if !ok {
		return nil
	}
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address:       tcp.IP.String(),
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(tcp.Port)},
	}}}
}

// frame is msg as one uncompressed gRPC message on the wire.
func frame(msg []byte) []byte {
	n := len(msg)
	return append([]byte{0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}, msg...)
}
