package authority

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/authority/selector"
	"github.com/writmesh/writ/internal/svidpeer"
)

// Bounds on what one node API call may ask for.
const (
	maxCSRsPerCall   = 256
	nodeCallTimeout  = 30 * time.Second
	MaxNodeAPIMsgLen = 4 << 20
)

// NodeServerOptions configures a NodeServer.
type NodeServerOptions struct {
	TrustDomain spiffeid.TrustDomain
	// NodeSVIDTTL is the lifetime of node SVIDs; 0 means the CA's default.
	NodeSVIDTTL time.Duration
	Clock       clockwork.Clock
	Log         *slog.Logger
	// Metrics, when set, receives the issuance counters.
	Metrics prometheus.Registerer
}

// NodeServer serves the node API (authority/nodeapi) to agents: join-token
// attestation, node SVID renewal, entry sync and workload SVID signing.
// Every outcome, refusals included, goes to the issuance log. Safe for
// concurrent use.
type NodeServer struct {
	nodeapi.UnimplementedNodeServer
	signer  Signer
	reg     *Registry
	o       NodeServerOptions
	issued  *prometheus.CounterVec
	refused *prometheus.CounterVec
}

var _ nodeapi.NodeServer = (*NodeServer)(nil)

// NewNodeServer returns a NodeServer.
func NewNodeServer(signer Signer, reg *Registry, o NodeServerOptions) *NodeServer {
	if o.Clock == nil {
		o.Clock = clockwork.NewRealClock()
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	s := &NodeServer{
		signer: signer, reg: reg, o: o,
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_identities_issued_total", Help: "Identities issued by the node API, by kind.",
		}, []string{"kind"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_identities_refused_total", Help: "Identity requests refused by the node API, by kind.",
		}, []string{"kind"}),
	}
	for _, k := range []string{KindX509SVID, KindJWTSVID, KindNodeSVID, KindJoinToken} {
		s.issued.WithLabelValues(k)
		s.refused.WithLabelValues(k)
	}
	if o.Metrics != nil {
		o.Metrics.MustRegister(s.issued, s.refused)
	}
	return s
}

// GRPCServerOptions are the options writd serves the node API with: TLS
// from tlsCfg, bounded messages, and a deadline on every call.
func GRPCServerOptions(tlsCfg *tls.Config) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.Creds(credentials.NewTLS(tlsCfg)),
		grpc.MaxRecvMsgSize(MaxNodeAPIMsgLen),
		grpc.MaxSendMsgSize(MaxNodeAPIMsgLen),
		grpc.ConnectionTimeout(10 * time.Second),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			ctx, cancel := context.WithTimeout(ctx, nodeCallTimeout)
			defer cancel()
			return h(ctx, req)
		}),
	}
}

// Attest exchanges a join token and a CSR for a node SVID.
func (s *NodeServer) Attest(ctx context.Context, req *nodeapi.AttestRequest) (*nodeapi.AttestResponse, error) {
	caller := peerAddr(ctx)
	csr, err := ParseCSR(req.GetCsr())
	if err != nil {
		s.refuse(ctx, Issuance{Kind: KindNodeSVID, Caller: caller, Reason: err.Error()})
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	if len(csr.URIs) > 1 || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		const msg = "csr: a node CSR may carry at most its node SPIFFE ID as a URI SAN"
		s.refuse(ctx, Issuance{Kind: KindNodeSVID, Caller: caller, Reason: msg})
		return nil, status.Error(codes.InvalidArgument, msg)
	}
	nodeID, err := s.reg.ConsumeJoinToken(ctx, req.GetJoinToken(), caller)
	if err != nil {
		s.refuse(ctx, Issuance{Kind: KindJoinToken, Caller: caller, Reason: err.Error()})
		return nil, toStatus(err, codes.PermissionDenied)
	}
	_ = s.reg.RecordIssuance(ctx, Issuance{Kind: KindJoinToken, Outcome: OutcomeUsed, SPIFFEID: nodeID.String(), NodeID: nodeID.String(), Caller: caller})
	if err := CheckCSRFor(csr, nodeID); err != nil {
		s.refuse(ctx, Issuance{Kind: KindNodeSVID, SPIFFEID: nodeID.String(), NodeID: nodeID.String(), Caller: caller, Reason: err.Error()})
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	svid, err := s.issueNode(ctx, csr, nodeID, "join_token", OutcomeIssued, caller)
	if err != nil {
		return nil, err
	}
	b, err := s.bundle(ctx)
	if err != nil {
		return nil, err
	}
	s.o.Log.Info("node attested", "node", nodeID.String(), "method", "join_token", "peer", caller, "serial", svid.Serial)
	return &nodeapi.AttestResponse{Svid: svidProto(nodeID, svid), Bundle: b}, nil
}

// RenewNode signs a fresh node SVID for the calling node.
func (s *NodeServer) RenewNode(ctx context.Context, req *nodeapi.RenewNodeRequest) (*nodeapi.RenewNodeResponse, error) {
	nodeID, err := s.callerNode(ctx)
	if err != nil {
		return nil, err
	}
	csr, err := ParseCSR(req.GetCsr())
	if err == nil {
		err = CheckCSRFor(csr, nodeID)
	}
	if err != nil {
		s.refuse(ctx, Issuance{Kind: KindNodeSVID, SPIFFEID: nodeID.String(), NodeID: nodeID.String(), Caller: nodeID.String(), Reason: err.Error()})
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	svid, err := s.issueNode(ctx, csr, nodeID, "", OutcomeRenewed, nodeID.String())
	if err != nil {
		return nil, err
	}
	return &nodeapi.RenewNodeResponse{Svid: svidProto(nodeID, svid)}, nil
}

func (s *NodeServer) issueNode(ctx context.Context, csr *x509.CertificateRequest, nodeID spiffeid.ID, attestation, outcome, caller string) (*IssuedX509, error) {
	svid, err := s.signer.SignX509SVID(ctx, X509Request{CSR: csr, ID: nodeID, TTL: s.o.NodeSVIDTTL})
	if err != nil {
		s.refuse(ctx, Issuance{Kind: KindNodeSVID, SPIFFEID: nodeID.String(), NodeID: nodeID.String(), Caller: caller, Reason: err.Error()})
		return nil, s.internal(ctx, "sign node svid", err)
	}
	if err := s.reg.UpsertNode(ctx, nodeID, attestation, svid.Serial, svid.NotAfter); err != nil {
		return nil, s.internal(ctx, "record node", err)
	}
	if err := s.record(ctx, Issuance{Kind: KindNodeSVID, Outcome: outcome, Serial: svid.Serial, SPIFFEID: nodeID.String(),
		NotAfter: svid.NotAfter, NodeID: nodeID.String(), Caller: caller, Signer: svid.Signer}); err != nil {
		// An identity nobody can account for must not be handed out.
		return nil, s.internal(ctx, "record issuance", err)
	}
	return svid, nil
}

// FetchEntries returns the entries registered to the calling node.
func (s *NodeServer) FetchEntries(ctx context.Context, _ *nodeapi.FetchEntriesRequest) (*nodeapi.FetchEntriesResponse, error) {
	nodeID, err := s.callerNode(ctx)
	if err != nil {
		return nil, err
	}
	entries, err := s.reg.ListEntries(ctx, &nodeID)
	if err != nil {
		return nil, s.internal(ctx, "list entries", err)
	}
	b, err := s.bundle(ctx)
	if err != nil {
		return nil, err
	}
	resp := &nodeapi.FetchEntriesResponse{Bundle: b}
	for _, e := range entries {
		resp.Entries = append(resp.Entries, entryProto(e))
	}
	return resp, nil
}

// SignX509SVIDs signs one CSR per entry of the calling node. A refused CSR
// gets an error in its result; the others are still signed.
func (s *NodeServer) SignX509SVIDs(ctx context.Context, req *nodeapi.SignX509SVIDsRequest) (*nodeapi.SignX509SVIDsResponse, error) {
	nodeID, err := s.callerNode(ctx)
	if err != nil {
		return nil, err
	}
	if n := len(req.GetCsrs()); n == 0 || n > maxCSRsPerCall {
		return nil, status.Errorf(codes.InvalidArgument, "send between 1 and %d CSRs per call", maxCSRsPerCall)
	}
	entries, err := s.entriesOf(ctx, nodeID)
	if err != nil {
		return nil, err
	}
	// Every outcome goes to the log in one batch before any SVID is
	// handed out: an identity nobody can account for is never returned.
	resp := &nodeapi.SignX509SVIDsResponse{}
	var log []Issuance
	refuse := func(res *nodeapi.SignResult, is Issuance, reason string) {
		is.Kind, is.Outcome, is.NodeID, is.Caller, is.Reason = KindX509SVID, OutcomeRefused, nodeID.String(), nodeID.String(), reason
		log = append(log, is)
		res.Error = reason
	}
	for _, c := range req.GetCsrs() {
		res := &nodeapi.SignResult{EntryId: c.GetEntryId()}
		resp.Results = append(resp.Results, res)
		e, ok := entries[c.GetEntryId()]
		if !ok {
			refuse(res, Issuance{}, fmt.Sprintf("entry %q is not registered to node %s", truncate(c.GetEntryId(), 64), nodeID))
			continue
		}
		is := Issuance{SPIFFEID: e.SPIFFEID.String(), EntryID: e.ID}
		csr, err := ParseCSR(c.GetCsr())
		if err == nil {
			err = CheckCSRFor(csr, e.SPIFFEID)
		}
		if err != nil {
			refuse(res, is, "csr: "+err.Error())
			continue
		}
		svid, err := s.signer.SignX509SVID(ctx, X509Request{CSR: csr, ID: e.SPIFFEID, TTL: e.X509TTL})
		if err != nil {
			s.o.Log.Error("sign x509 svid", "spiffe_id", e.SPIFFEID.String(), "error", err)
			refuse(res, is, "signing failed")
			continue
		}
		is.Kind, is.Outcome, is.Serial, is.NotAfter, is.NodeID, is.Caller, is.Signer = KindX509SVID, OutcomeIssued, svid.Serial, svid.NotAfter, nodeID.String(), nodeID.String(), svid.Signer
		log = append(log, is)
		res.Svid = svidProto(e.SPIFFEID, svid)
	}
	if err := s.reg.RecordIssuance(ctx, log...); err != nil {
		return nil, s.internal(ctx, "record issuance", err)
	}
	for _, is := range log {
		if is.Outcome == OutcomeRefused {
			s.refused.WithLabelValues(is.Kind).Inc()
			s.o.Log.Warn("identity request refused", "kind", is.Kind, "spiffe_id", is.SPIFFEID, "node", is.NodeID, "reason", is.Reason)
		} else {
			s.issued.WithLabelValues(is.Kind).Inc()
		}
	}
	return resp, nil
}

// MintJWTSVID signs a JWT-SVID for an entry of the calling node.
func (s *NodeServer) MintJWTSVID(ctx context.Context, req *nodeapi.MintJWTSVIDRequest) (*nodeapi.MintJWTSVIDResponse, error) {
	nodeID, err := s.callerNode(ctx)
	if err != nil {
		return nil, err
	}
	aud := req.GetAudience()
	if len(aud) == 0 || len(aud) > maxAudiences {
		return nil, status.Errorf(codes.InvalidArgument, "audience: give between 1 and %d values", maxAudiences)
	}
	for _, a := range aud {
		if a == "" || len(a) > maxAudienceLen {
			return nil, status.Errorf(codes.InvalidArgument, "audience: values must be non-empty and at most %d bytes", maxAudienceLen)
		}
	}
	entries, err := s.entriesOf(ctx, nodeID)
	if err != nil {
		return nil, err
	}
	e, ok := entries[req.GetEntryId()]
	if !ok {
		reason := fmt.Sprintf("entry %q is not registered to node %s", truncate(req.GetEntryId(), 64), nodeID)
		s.refuse(ctx, Issuance{Kind: KindJWTSVID, NodeID: nodeID.String(), Caller: nodeID.String(), Reason: reason})
		return nil, status.Error(codes.PermissionDenied, reason)
	}
	jwt, err := s.signer.SignJWTSVID(ctx, e.SPIFFEID, aud, e.JWTTTL)
	if err != nil {
		s.refuse(ctx, Issuance{Kind: KindJWTSVID, SPIFFEID: e.SPIFFEID.String(), NodeID: nodeID.String(), EntryID: e.ID, Caller: nodeID.String(), Reason: err.Error()})
		return nil, s.internal(ctx, "sign jwt svid", err)
	}
	if err := s.record(ctx, Issuance{Kind: KindJWTSVID, Outcome: OutcomeIssued, SPIFFEID: e.SPIFFEID.String(), NotAfter: jwt.ExpiresAt,
		NodeID: nodeID.String(), EntryID: e.ID, Caller: nodeID.String(), Signer: jwt.KeyID}); err != nil {
		return nil, s.internal(ctx, "record issuance", err)
	}
	return &nodeapi.MintJWTSVIDResponse{SpiffeId: e.SPIFFEID.String(), Token: jwt.Token, ExpiresAt: jwt.ExpiresAt.Unix()}, nil
}

// FetchBundle returns the trust bundle.
func (s *NodeServer) FetchBundle(ctx context.Context, _ *nodeapi.FetchBundleRequest) (*nodeapi.FetchBundleResponse, error) {
	if _, err := s.callerNode(ctx); err != nil {
		return nil, err
	}
	b, err := s.bundle(ctx)
	if err != nil {
		return nil, err
	}
	return &nodeapi.FetchBundleResponse{Bundle: b}, nil
}

// callerNode authenticates the caller by the node SVID it presented. The
// TLS layer has verified the chain against the bundle; here the ID must be
// a node of this trust domain that attested and is not banned.
func (s *NodeServer) callerNode(ctx context.Context) (spiffeid.ID, error) {
	id, err := svidpeer.FromGRPC(ctx, "this call needs the node's X.509 SVID as a client certificate")
	if err != nil {
		return spiffeid.ID{}, err
	}
	if _, err := s.reg.ValidateNodeID(id.String()); err != nil {
		return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "%s is not a node identity", id)
	}
	n, err := s.reg.GetNode(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "node %s has not attested", id)
	}
	if err != nil {
		return spiffeid.ID{}, s.internal(ctx, "get node", err)
	}
	if n.Banned {
		return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "node %s is banned", id)
	}
	return id, nil
}

func (s *NodeServer) entriesOf(ctx context.Context, nodeID spiffeid.ID) (map[string]*Entry, error) {
	list, err := s.reg.ListEntries(ctx, &nodeID)
	if err != nil {
		return nil, s.internal(ctx, "list entries", err)
	}
	m := make(map[string]*Entry, len(list))
	for _, e := range list {
		m[e.ID] = e
	}
	return m, nil
}

func (s *NodeServer) bundle(ctx context.Context) (*nodeapi.Bundle, error) {
	b, err := s.signer.Bundle(ctx)
	if err != nil {
		return nil, s.internal(ctx, "bundle", err)
	}
	return BundleProto(b)
}

// BundleProto renders a bundle for the node API.
func BundleProto(b *spiffebundle.Bundle) (*nodeapi.Bundle, error) {
	doc, err := b.Marshal()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "marshal bundle: %v", err)
	}
	seq, _ := b.SequenceNumber()
	return &nodeapi.Bundle{TrustDomain: b.TrustDomain().Name(), SpiffeBundle: doc, Sequence: seq}, nil
}

// record appends a successful issuance to the log and counts it.
func (s *NodeServer) record(ctx context.Context, is Issuance) error {
	if err := s.reg.RecordIssuance(ctx, is); err != nil {
		return err
	}
	s.issued.WithLabelValues(is.Kind).Inc()
	return nil
}

func (s *NodeServer) refuse(ctx context.Context, is Issuance) {
	s.refused.WithLabelValues(is.Kind).Inc()
	is.Outcome = OutcomeRefused
	if err := s.reg.RecordIssuance(ctx, is); err != nil {
		s.o.Log.Error("record refusal", "error", err)
	}
	s.o.Log.Warn("identity request refused", "kind", is.Kind, "spiffe_id", is.SPIFFEID, "node", is.NodeID, "caller", is.Caller, "reason", is.Reason)
}

// internal logs the cause and returns an error that does not leak it.
func (s *NodeServer) internal(_ context.Context, what string, err error) error {
	s.o.Log.Error("node api: "+what, "error", err)
	return status.Errorf(codes.Internal, "%s failed", what)
}

func toStatus(err error, code codes.Code) error {
	var ie *InputError
	if errors.As(err, &ie) {
		return status.Error(code, ie.Msg)
	}
	return status.Error(codes.Internal, "internal error")
}

func svidProto(id spiffeid.ID, s *IssuedX509) *nodeapi.X509SVID {
	out := &nodeapi.X509SVID{SpiffeId: id.String(), ExpiresAt: s.NotAfter.Unix()}
	for _, c := range s.Chain {
		out.CertChain = append(out.CertChain, c.Raw)
	}
	return out
}

func entryProto(e *Entry) *nodeapi.Entry {
	return &nodeapi.Entry{
		Id:             e.ID,
		SpiffeId:       e.SPIFFEID.String(),
		ParentId:       e.ParentID.String(),
		Selectors:      selector.Strings(e.Selectors),
		X509TtlSeconds: int32(e.X509TTL / time.Second),
		JwtTtlSeconds:  int32(e.JWTTTL / time.Second),
	}
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return "unknown"
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
