package enforcer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// testCA issues X509-SVIDs for one trust domain, for tests only.
type testCA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t testing.TB, td string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: td}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{td: spiffeid.RequireTrustDomainFromString(td), cert: cert, key: key}
}

func (ca *testCA) bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
}

func (ca *testCA) svid(t testing.TB, id string) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sid := spiffeid.RequireFromString(id)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{sid.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: sid, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

// TestServerOverMTLS drives the ext_authz service with a real gRPC client
// over a real socket, both sides authenticated with X509-SVIDs through
// go-spiffe, as Envoy's ext_authz client would.
func TestServerOverMTLS(t *testing.T) {
	ca := newTestCA(t, "cluster.local")
	enforcerID := "spiffe://cluster.local/ns/writ/sa/enforcer"
	envoyID := "spiffe://cluster.local/ns/shop/sa/envoy"
	rec := &recorder{}
	e := newEnforcer(t, filepath.Join("..", "policies", "mesh"), rec, clockwork.NewRealClock())
	srv := NewServer(e, 0)
	opts := append(ServerOptions(), grpc.Creds(credentials.NewTLS(
		tlsconfig.MTLSServerConfig(ca.svid(t, enforcerID), ca.bundle(), tlsconfig.AuthorizeMemberOf(ca.td)))))
	g := grpc.NewServer(opts...)
	srv.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- g.Serve(lis) }()
	t.Cleanup(func() {
		srv.Shutdown()
		g.GracefulStop()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})

	dial := func(t *testing.T, cfg *tls.Config) *grpc.ClientConn {
		t.Helper()
		cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return cc
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cc := dial(t, tlsconfig.MTLSClientConfig(ca.svid(t, envoyID), ca.bundle(), tlsconfig.AuthorizeID(spiffeid.RequireFromString(enforcerID))))

	hc, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: authv3.Authorization_ServiceDesc.ServiceName})
	if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health %v, %v", hc, err)
	}
	client := authv3.NewAuthorizationClient(cc)
	tests := []struct {
		name string
		req  *authv3.CheckRequest
		code code.Code
	}{
		{"allowed pair", goldenRequests()["grpc_mtls"], code.Code_OK},
		{"no peer identity", goldenRequests()["http1_plaintext"], code.Code_PERMISSION_DENIED},
		{"encoded slash", simpleRequest(clientID, "GET", "/a%2fb", nil), code.Code_INVALID_ARGUMENT},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := client.Check(ctx, tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if got := code.Code(resp.GetStatus().GetCode()); got != tt.code {
				t.Fatalf("status %v, want %v (%v)", got, tt.code, resp)
			}
		})
	}
	if len(rec.got) != len(tests) {
		t.Fatalf("%d decisions recorded for %d checks", len(rec.got), len(tests))
	}

	t.Run("client without SVID refused", func(t *testing.T) {
		anon := dial(t, tlsconfig.TLSClientConfig(ca.bundle(), tlsconfig.AuthorizeID(spiffeid.RequireFromString(enforcerID))))
		if _, err := authv3.NewAuthorizationClient(anon).Check(ctx, goldenRequests()["grpc_mtls"]); err == nil {
			t.Fatal("a client without a certificate got an answer")
		}
	})
	t.Run("client from another trust domain refused", func(t *testing.T) {
		other := newTestCA(t, "evil.example")
		bundles := x509bundle.NewSet(ca.bundle(), other.bundle())
		cc := dial(t, tlsconfig.MTLSClientConfig(other.svid(t, "spiffe://evil.example/ns/x/sa/y"), bundles, tlsconfig.AuthorizeID(spiffeid.RequireFromString(enforcerID))))
		if _, err := authv3.NewAuthorizationClient(cc).Check(ctx, goldenRequests()["grpc_mtls"]); err == nil {
			t.Fatal("a client from another trust domain got an answer")
		}
	})
	t.Run("oversized request refused", func(t *testing.T) {
		big := simpleRequest(clientID, "POST", "/x", nil)
		big.Attributes.Request.Http.Body = string(make([]byte, MaxCheckMessageBytes+1))
		if _, err := client.Check(ctx, big); status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("oversized request: %v, want ResourceExhausted", err)
		}
	})
}
