// Package svidpeer finds the SPIFFE ID of a gRPC caller from the client
// certificate its TLS handshake verified. Every mTLS gRPC service of Writ
// (node API, xDS, audit collector, authorization interceptors) names its
// caller this way, so the rule lives once: only a verified chain counts,
// never a certificate the peer merely sent.
package svidpeer

import (
	"context"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// FromGRPC returns the SPIFFE ID in the leaf of the caller's verified
// chain. Errors are gRPC Unauthenticated statuses; need says what the
// service expected (e.g. "xDS needs the workload's X.509 SVID") and is
// used when there is no verified client certificate.
func FromGRPC(ctx context.Context, need string) (spiffeid.ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, need)
	}
	id, err := x509svid.IDFromCert(ti.State.VerifiedChains[0][0])
	if err != nil {
		return spiffeid.ID{}, status.Errorf(codes.Unauthenticated, "client certificate is not an X.509 SVID: %v", err)
	}
	return id, nil
}
