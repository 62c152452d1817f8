// Package authoritytest starts a real Writ authority for tests: a CA on a
// fresh PostgreSQL database, the node API served over TLS on a loopback
// port, and the registry to create tokens and entries with. Only tests
// import it.
package authoritytest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/store/pgtest"
)

// TrustDomain is the trust domain the test authority serves.
var TrustDomain = spiffeid.RequireTrustDomainFromString("example.org")

// Env is a running authority.
type Env struct {
	Pool     *pgxpool.Pool
	CA       *authority.CA
	Registry *authority.Registry
	Clock    *clockwork.FakeClock
	Identity *authority.ServerIdentity
	// Addr is the node API's host:port.
	Addr string
}

// Options tune Start.
type Options struct {
	// CA overrides the CA settings (zero fields take the defaults).
	CA config.CA
	// Clock, when set, is used instead of a fake clock at time.Now().
	Clock *clockwork.FakeClock
	Log   *slog.Logger
}

// Start runs an authority until t ends.
func Start(t testing.TB, o Options) *Env {
	t.Helper()
	clock := o.Clock
	if clock == nil {
		clock = clockwork.NewFakeClockAt(time.Now())
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg := config.Server{TrustDomain: TrustDomain.Name(), DatabaseURL: "postgres://unused/", CA: o.CA}
	cfg.ApplyDefaults()
	pool := pgtest.NewMigrated(t)
	kek := make([]byte, 32)
	_, _ = rand.Read(kek)
	ctx := context.Background()
	ca, err := authority.NewCA(ctx, authority.Options{
		TrustDomain: TrustDomain, Pool: pool, Config: cfg.CA, ReplicaID: "test-replica", KEK: kek, Clock: clock, Log: log,
	})
	if err != nil {
		t.Fatalf("authoritytest: new ca: %v", err)
	}
	reg := authority.NewRegistry(pool, TrustDomain, clock)
	ident, err := authority.NewServerIdentity(ctx, ca, reg, TrustDomain, clock, log)
	if err != nil {
		t.Fatalf("authoritytest: server identity: %v", err)
	}
	srv := grpc.NewServer(authority.GRPCServerOptions(ident.TLSConfig())...)
	nodeapi.RegisterNodeServer(srv, authority.NewNodeServer(ca, reg, authority.NodeServerOptions{TrustDomain: TrustDomain, Clock: clock, Log: log}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{}, 3)
	go func() { _ = srv.Serve(l); done <- struct{}{} }()
	go func() { _ = ca.Run(runCtx); done <- struct{}{} }()
	go func() { _ = ident.Run(runCtx); done <- struct{}{} }()
	t.Cleanup(func() {
		srv.Stop()
		cancel()
		for range 3 {
			<-done
		}
	})
	return &Env{Pool: pool, CA: ca, Registry: reg, Clock: clock, Identity: ident, Addr: l.Addr().String()}
}

// Bundle returns the current trust bundle.
func (e *Env) Bundle(t testing.TB) *spiffebundle.Bundle {
	t.Helper()
	b, err := e.CA.Bundle(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Dial connects to the node API as a client that authenticates writd
// against the current bundle and presents svid when it is not nil.
func (e *Env) Dial(t testing.TB, svid *x509svid.SVID) nodeapi.NodeClient {
	t.Helper()
	b := e.Bundle(t)
	authz := tlsconfig.AuthorizeID(authority.ControlPlaneID(TrustDomain))
	var cfg *tls.Config
	if svid == nil {
		cfg = tlsconfig.TLSClientConfig(b, authz)
	} else {
		cfg = tlsconfig.MTLSClientConfig(svid, b, authz)
	}
	conn, err := grpc.NewClient(e.Addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return nodeapi.NewNodeClient(conn)
}

// CSR makes a key and a DER CSR for id (no SAN when id is zero).
func CSR(t testing.TB, id spiffeid.ID) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{}
	if !id.IsZero() {
		u, _ := url.Parse(id.String())
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return key, der
}

// SVID assembles an x509svid.SVID from a node API answer and its key.
func SVID(t testing.TB, chain [][]byte, key *ecdsa.PrivateKey) *x509svid.SVID {
	t.Helper()
	var certs []*x509.Certificate
	for _, der := range chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, c)
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}
}

// Attest creates a join token for node name and attests with it, returning
// the node's SVID.
func (e *Env) Attest(t testing.TB, name string) *x509svid.SVID {
	t.Helper()
	ctx := context.Background()
	tok, err := e.Registry.CreateJoinToken(ctx, "spiffe://"+TrustDomain.Name()+"/node/"+name, 10*time.Minute, "test")
	if err != nil {
		t.Fatal(err)
	}
	key, csr := CSR(t, spiffeid.ID{})
	resp, err := e.Dial(t, nil).Attest(ctx, &nodeapi.AttestRequest{JoinToken: tok.Token, Csr: csr})
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	return SVID(t, resp.GetSvid().GetCertChain(), key)
}
