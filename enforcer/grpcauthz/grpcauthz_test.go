package grpcauthz_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/enforcer/grpcauthz"
	"github.com/writmesh/writ/policy"
)

// The policy reads the peer's SPIFFE ID, the method, a header and, for
// unary calls, the decoded request message.
const testPolicy = `package envoy.authz

default allow := false

allow if {
	input.writ.source.service_account == "web"
	input.attributes.request.http.path == "/grpc.health.v1.Health/Check"
	input.parsed_body.service == "orders"
}

allow if {
	input.writ.source.service_account == "ops"
	input.attributes.request.http.path == "/grpc.health.v1.Health/Watch"
	input.attributes.request.http.headers["x-team"] == "sre"
}
`

type recorder struct {
	mu  sync.Mutex
	got []enforcer.Decision
	err error
}

func (r *recorder) Record(_ context.Context, d enforcer.Decision) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, d)
	return r.err
}

func (r *recorder) last() enforcer.Decision {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.got[len(r.got)-1]
}

func (r *recorder) fail(err error) {
	r.mu.Lock()
	r.err = err
	r.mu.Unlock()
}

func svid(t *testing.T, a *authoritytest.Env, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key, der := authoritytest.CSR(t, id)
	csr, err := authority.ParseCSR(der)
	if err != nil {
		t.Fatal(err)
	}
	s, err := a.CA.SignX509SVID(context.Background(), authority.X509Request{CSR: csr, ID: id})
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: s.Chain, PrivateKey: key}
}

// TestInterceptorsOverMTLS: a real grpc-go server with the interceptors
// and a real client, both with SVIDs: calls are decided on the peer's
// SPIFFE ID, the method, metadata and the request message; denials are
// PermissionDenied, an audit failure Unavailable; every call is recorded.
func TestInterceptorsOverMTLS(t *testing.T) {
	ctx := context.Background()
	a := authoritytest.Start(t, authoritytest.Options{})
	td := authoritytest.TrustDomain
	serverID := spiffeid.RequireFromSegments(td, "ns", "shop", "sa", "orders")
	web := spiffeid.RequireFromSegments(td, "ns", "shop", "sa", "web")
	ops := spiffeid.RequireFromSegments(td, "ns", "shop", "sa", "ops")

	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "authz.rego"), []byte(testPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	engine, err := policy.NewEngine(ctx, policy.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	enf, err := enforcer.New(enforcer.Options{Engine: engine, Sink: rec, ProtoDescriptors: protoregistry.GlobalFiles})
	if err != nil {
		t.Fatal(err)
	}
	bundle := a.Bundle(t)
	// serve starts a server whose credentials verify client SVIDs in a
	// callback (no VerifiedChains), as svidtls does.
	serve := func(opts grpcauthz.Options) string {
		authz, err := grpcauthz.New(opts)
		if err != nil {
			t.Fatal(err)
		}
		srv := grpc.NewServer(
			grpc.Creds(credentials.NewTLS(svidtls.ServerConfig(svid(t, a, serverID), bundle, svidtls.AuthorizeMemberOf(td), a.Clock))),
			grpc.UnaryInterceptor(authz.UnaryServerInterceptor()),
			grpc.StreamInterceptor(authz.StreamServerInterceptor()),
		)
		hs := health.NewServer()
		hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
		hs.SetServingStatus("secret", healthpb.HealthCheckResponse_SERVING)
		healthpb.RegisterHealthServer(srv, hs)
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = srv.Serve(l) }()
		t.Cleanup(srv.Stop)
		return l.Addr().String()
	}
	addr := serve(grpcauthz.Options{Enforcer: enf, ServerID: serverID, Service: "orders", IncludeBody: true, Bundle: bundle, Clock: a.Clock})
	// Without a bundle, a chain the handshake did not verify names nobody.
	anonAddr := serve(grpcauthz.Options{Enforcer: enf, ServerID: serverID, IncludeBody: true})

	dial := func(id spiffeid.ID, addr string) healthpb.HealthClient {
		cfg := svidtls.ClientConfig(svid(t, a, id), bundle, svidtls.AuthorizeID(serverID), a.Clock)
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return healthpb.NewHealthClient(cc)
	}
	client := func(id spiffeid.ID) healthpb.HealthClient { return dial(id, addr) }
	webClient, opsClient := client(web), client(ops)
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()

	unary := []struct {
		name    string
		c       healthpb.HealthClient
		service string
		want    codes.Code
	}{
		{"allowed by peer, method and message", webClient, "orders", codes.OK},
		{"message the policy refuses", webClient, "secret", codes.PermissionDenied},
		{"peer the policy refuses", opsClient, "orders", codes.PermissionDenied},
	}
	for _, tc := range unary {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.c.Check(cctx, &healthpb.HealthCheckRequest{Service: tc.service})
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code %v (%v), want %v", got, err, tc.want)
			}
			d := rec.last()
			wantResult := enforcer.ResultDeny
			if tc.want == codes.OK {
				wantResult = enforcer.ResultAllow
			}
			if d.Result != wantResult || d.Path != "/grpc.health.v1.Health/Check" || !d.GRPC || d.Destination != serverID.String() {
				t.Fatalf("decision %+v", d)
			}
		})
	}
	if d := rec.got[0]; d.Source != web.String() || len(d.MatchedRules) != 1 || d.MatchedRules[0] != "authz.rego:5 data.envoy.authz.allow" {
		t.Fatalf("first decision: source %q, rules %q", d.Source, d.MatchedRules)
	}
	// Over mTLS, with the client SVID's expiry, on every call of the
	// connection.
	for _, d := range rec.got {
		if !d.MTLS || d.PeerCertNotAfter.IsZero() || !d.PeerCertNotAfter.After(a.Clock.Now()) || d.PeerCertNotAfter.After(a.Clock.Now().Add(24*time.Hour)) {
			t.Fatalf("decision %s: mtls %v, peer certificate expiry %v", d.Path, d.MTLS, d.PeerCertNotAfter)
		}
	}

	stream := []struct {
		name string
		c    healthpb.HealthClient
		md   metadata.MD
		want codes.Code
	}{
		{"stream allowed by metadata", opsClient, metadata.Pairs("x-team", "sre"), codes.OK},
		{"stream without the header", opsClient, nil, codes.PermissionDenied},
		{"stream from another peer", webClient, metadata.Pairs("x-team", "sre"), codes.PermissionDenied},
	}
	for _, tc := range stream {
		t.Run(tc.name, func(t *testing.T) {
			sctx, cancel := context.WithCancel(metadata.NewOutgoingContext(cctx, tc.md))
			defer cancel()
			w, err := tc.c.Watch(sctx, &healthpb.HealthCheckRequest{Service: "orders"})
			if err == nil {
				_, err = w.Recv()
			}
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code %v (%v), want %v", got, err, tc.want)
			}
			if d := rec.last(); d.Path != "/grpc.health.v1.Health/Watch" || (d.Result == enforcer.ResultAllow) != (tc.want == codes.OK) {
				t.Fatalf("decision %+v", d)
			}
		})
	}

	if _, err := dial(web, anonAddr).Check(cctx, &healthpb.HealthCheckRequest{Service: "orders"}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("unverified chain without a bundle: %v, want PermissionDenied", err)
	}
	if d := rec.last(); d.Source != "" || d.MTLS || !d.PeerCertNotAfter.IsZero() {
		t.Fatalf("unverified chain named %q (mtls %v, expiry %v)", d.Source, d.MTLS, d.PeerCertNotAfter)
	}

	// A decision that cannot be recorded is not enforced: Unavailable.
	rec.fail(errors.New("spool full"))
	if _, err := webClient.Check(cctx, &healthpb.HealthCheckRequest{Service: "orders"}); status.Code(err) != codes.Unavailable {
		t.Fatalf("with a failing sink: %v, want Unavailable", err)
	}
}
