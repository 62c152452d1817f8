package svidpeer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/url"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

func TestFromGRPC(t *testing.T) {
	svid := &x509.Certificate{URIs: []*url.URL{{Scheme: "spiffe", Host: "example.org", Path: "/ns/a/sa/b"}}}
	withState := func(st tls.ConnectionState) context.Context {
		return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{State: st}})
	}
	id, err := FromGRPC(withState(tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{svid}}}), "need")
	if err != nil || id.String() != "spiffe://example.org/ns/a/sa/b" {
		t.Fatalf("verified SVID: %v, %v", id, err)
	}
	for name, ctx := range map[string]context.Context{
		"no peer": context.Background(),
		// A certificate the peer sent but nothing verified must not count.
		"unverified":  withState(tls.ConnectionState{PeerCertificates: []*x509.Certificate{svid}}),
		"not an SVID": withState(tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{{}}}}),
	} {
		if _, err := FromGRPC(ctx, "need"); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: err = %v, want Unauthenticated", name, err)
		}
	}
}
