package agent

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/writmesh/writ/authority/nodeapi"
)

// fakeWritd is a test-only node API server: a real gRPC server on a real
// TLS socket with a CA minted here, standing in for writd until the real
// node server exists. Safe for concurrent use.
type fakeWritd struct {
	nodeapi.UnimplementedNodeServer
	t      testing.TB
	td     spiffeid.TrustDomain
	clk    clockwork.Clock
	rootK  crypto.Signer
	root   *x509.Certificate
	jwtK   crypto.Signer
	bundle *spiffebundle.Bundle
	tlsCfg *tls.Config

	addr string
	srv  *grpc.Server
	lis  net.Listener

	mu      sync.Mutex
	tokens  map[string]bool // unused join tokens
	nodes   map[spiffeid.ID]bool
	entries map[string]*nodeapi.Entry
	ttl     time.Duration
	seq     uint64
	calls   map[string]int
}

const testTD = "example.org"

func newFakeWritd(t testing.TB, clk clockwork.Clock) *fakeWritd {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString(testTD)
	f := &fakeWritd{
		t: t, td: td, clk: clk,
		tokens:  map[string]bool{},
		nodes:   map[spiffeid.ID]bool{},
		entries: map[string]*nodeapi.Entry{},
		ttl:     time.Hour,
		seq:     1,
		calls:   map[string]int{},
	}
	f.rootK = mustKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(72 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, f.rootK.Public(), f.rootK)
	if err != nil {
		t.Fatal(err)
	}
	f.root, _ = x509.ParseCertificate(der)
	f.jwtK = mustKey(t)
	f.bundle = spiffebundle.New(td)
	f.bundle.AddX509Authority(f.root)
	if err := f.bundle.AddJWTAuthority("k1", f.jwtK.Public()); err != nil {
		t.Fatal(err)
	}
	f.bundle.SetSequenceNumber(1)

	cpKey := mustKey(t)
	cpCert := f.sign(t, spiffeid.RequireFromSegments(td, "writ", "control-plane"), cpKey.Public(), 24*time.Hour)
	cpSVID := &x509svid.SVID{ID: spiffeid.RequireFromSegments(td, "writ", "control-plane"), Certificates: []*x509.Certificate{cpCert}, PrivateKey: cpKey}
	cfg := tlsconfig.TLSServerConfig(cpSVID)
	// Attest needs no client certificate; every other call checks one.
	cfg.ClientAuth = tls.RequestClientCert
	cfg.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return nil
		}
		_, _, err := x509svid.ParseAndVerify(raw, f.bundle)
		return err
	}
	f.tlsCfg = cfg
	f.start(t, "127.0.0.1:0")
	return f
}

func (f *fakeWritd) start(t testing.TB, addr string) {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	f.addr = l.Addr().String()
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(f.tlsCfg)))
	nodeapi.RegisterNodeServer(srv, f)
	go srv.Serve(l)
	f.mu.Lock()
	f.srv, f.lis = srv, l
	f.mu.Unlock()
	t.Cleanup(srv.Stop)
}

// stop takes writd off the network; restart brings it back on the same
// address.
func (f *fakeWritd) stop() {
	f.mu.Lock()
	srv, l := f.srv, f.lis
	f.mu.Unlock()
	srv.Stop()
	// Serve may not have taken the listener yet; close it here so the
	// address is free for restart.
	l.Close()
}

func (f *fakeWritd) restart(t testing.TB) { f.start(t, f.addr) }

func mustKey(t testing.TB) crypto.Signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// sign issues a leaf SVID. NotBefore is backdated below both the fake and
// the real clock, because TLS handshakes verify against real time while
// lifetimes follow the fake clock.
func (f *fakeWritd) sign(t interface{ Fatal(...any) }, id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	nb := f.clk.Now()
	if now := time.Now(); now.Before(nb) {
		nb = now
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             nb.Add(-time.Minute),
		NotAfter:              f.clk.Now().Add(ttl),
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, f.root, pub, f.rootK)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func (f *fakeWritd) newToken(tok string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tokens[tok] = true
}

func (f *fakeWritd) putEntry(e *nodeapi.Entry) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries[e.Id] = e
}

func (f *fakeWritd) removeEntry(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.entries, id)
}

func (f *fakeWritd) count(call string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[call]
}

// bundleMsg is the bundle as sent; callers hold f.mu.
func (f *fakeWritd) bundleMsg() *nodeapi.Bundle {
	b, err := f.bundle.Marshal()
	if err != nil {
		f.t.Error(err)
	}
	return &nodeapi.Bundle{TrustDomain: testTD, SpiffeBundle: b, Sequence: f.seq}
}

// caller returns the node ID of the mTLS peer.
func (f *fakeWritd) caller(ctx context.Context) (spiffeid.ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "node SVID required")
	}
	id, err := x509svid.IDFromCert(ti.State.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, err.Error())
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.nodes[id] {
		return spiffeid.ID{}, status.Error(codes.PermissionDenied, "unknown node")
	}
	return id, nil
}

func (f *fakeWritd) signCSR(der []byte, id spiffeid.ID) (*nodeapi.X509SVID, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	var serr error
	c := f.sign(fatalFunc(func(a ...any) { serr = errors.New(fmt.Sprint(a...)) }), id, csr.PublicKey, f.ttl)
	if serr != nil {
		return nil, serr
	}
	return &nodeapi.X509SVID{SpiffeId: id.String(), CertChain: [][]byte{c.Raw}, ExpiresAt: c.NotAfter.Unix()}, nil
}

type fatalFunc func(...any)

func (f fatalFunc) Fatal(a ...any) { f(a...) }

func (f *fakeWritd) Attest(_ context.Context, req *nodeapi.AttestRequest) (*nodeapi.AttestResponse, error) {
	f.mu.Lock()
	f.calls["Attest"]++
	ok := f.tokens[req.JoinToken]
	delete(f.tokens, req.JoinToken)
	f.mu.Unlock()
	if !ok {
		return nil, status.Error(codes.PermissionDenied, "join token unknown or used")
	}
	id := spiffeid.RequireFromSegments(f.td, "node", "n1")
	svid, err := f.signCSR(req.Csr, id)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nodes[id] = true
	return &nodeapi.AttestResponse{Svid: svid, Bundle: f.bundleMsg()}, nil
}

func (f *fakeWritd) RenewNode(ctx context.Context, req *nodeapi.RenewNodeRequest) (*nodeapi.RenewNodeResponse, error) {
	id, err := f.caller(ctx)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.calls["RenewNode"]++
	f.mu.Unlock()
	svid, err := f.signCSR(req.Csr, id)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return &nodeapi.RenewNodeResponse{Svid: svid}, nil
}

func (f *fakeWritd) FetchEntries(ctx context.Context, _ *nodeapi.FetchEntriesRequest) (*nodeapi.FetchEntriesResponse, error) {
	id, err := f.caller(ctx)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["FetchEntries"]++
	resp := &nodeapi.FetchEntriesResponse{Bundle: f.bundleMsg()}
	for _, e := range f.entries {
		c := proto.Clone(e).(*nodeapi.Entry)
		c.ParentId = id.String()
		resp.Entries = append(resp.Entries, c)
	}
	return resp, nil
}

func (f *fakeWritd) SignX509SVIDs(ctx context.Context, req *nodeapi.SignX509SVIDsRequest) (*nodeapi.SignX509SVIDsResponse, error) {
	if _, err := f.caller(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.calls["SignX509SVIDs"]++
	entries := map[string]*nodeapi.Entry{}
	for k, v := range f.entries {
		entries[k] = v
	}
	f.mu.Unlock()
	resp := &nodeapi.SignX509SVIDsResponse{}
	for _, c := range req.Csrs {
		e, ok := entries[c.EntryId]
		if !ok {
			resp.Results = append(resp.Results, &nodeapi.SignResult{EntryId: c.EntryId, Error: "no such entry"})
			continue
		}
		svid, err := f.signCSR(c.Csr, spiffeid.RequireFromString(e.SpiffeId))
		if err != nil {
			resp.Results = append(resp.Results, &nodeapi.SignResult{EntryId: c.EntryId, Error: err.Error()})
			continue
		}
		resp.Results = append(resp.Results, &nodeapi.SignResult{EntryId: c.EntryId, Svid: svid})
	}
	return resp, nil
}

func (f *fakeWritd) MintJWTSVID(ctx context.Context, req *nodeapi.MintJWTSVIDRequest) (*nodeapi.MintJWTSVIDResponse, error) {
	if _, err := f.caller(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.calls["MintJWTSVID"]++
	e, ok := f.entries[req.EntryId]
	f.mu.Unlock()
	if !ok {
		return nil, status.Error(codes.NotFound, "no such entry")
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: f.jwtK, KeyID: "k1"}}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	now := f.clk.Now()
	exp := now.Add(5 * time.Minute)
	tok, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject:  e.SpiffeId,
		Audience: jwt.Audience(req.Audience),
		Expiry:   jwt.NewNumericDate(exp),
		IssuedAt: jwt.NewNumericDate(now),
	}).Serialize()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &nodeapi.MintJWTSVIDResponse{SpiffeId: e.SpiffeId, Token: tok, ExpiresAt: exp.Unix()}, nil
}

func (f *fakeWritd) FetchBundle(ctx context.Context, _ *nodeapi.FetchBundleRequest) (*nodeapi.FetchBundleResponse, error) {
	if _, err := f.caller(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return &nodeapi.FetchBundleResponse{Bundle: f.bundleMsg()}, nil
}
