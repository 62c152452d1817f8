// Package authority is Writ's certificate authority: it owns the root and
// intermediate CA keys, signs X.509 and JWT SVIDs, publishes the trust
// bundle, attests nodes with join tokens, keeps registration entries, and
// records every identity it issues or refuses. The workload-side agent is
// its subpackage agent.
//
// It may import config and store; policy, enforcer, audit, xds, proxy, api
// and cmd import it, never the reverse.
package authority

import (
	"context"
	"crypto/x509"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// X509Request asks the CA for an X.509 SVID.
type X509Request struct {
	// CSR has been parsed and its signature checked (see ParseCSR).
	CSR *x509.CertificateRequest
	// ID becomes the certificate's only URI SAN.
	ID spiffeid.ID
	// TTL is the wanted lifetime; 0 means the configured default. It is
	// capped at the configured maximum and at the signer's own expiry.
	TTL time.Duration
}

// IssuedX509 is a signed X.509 SVID.
type IssuedX509 struct {
	// Chain is leaf first, up to but excluding the root.
	Chain    []*x509.Certificate
	Serial   string // lowercase hex
	NotAfter time.Time
	// Signer is the serial of the intermediate that signed it.
	Signer string
}

// IssuedJWT is a signed JWT-SVID.
type IssuedJWT struct {
	Token     string
	ExpiresAt time.Time
	KeyID     string
}

// Signer is what the node API and writd need from the CA. Implementations
// are safe for concurrent use.
type Signer interface {
	SignX509SVID(ctx context.Context, req X509Request) (*IssuedX509, error)
	SignJWTSVID(ctx context.Context, id spiffeid.ID, audience []string, ttl time.Duration) (*IssuedJWT, error)
	// Bundle is the current trust bundle, its sequence number and refresh
	// hint set.
	Bundle(ctx context.Context) (*spiffebundle.Bundle, error)
}

// UpstreamSigner signs writd's intermediate CA certificates when an
// existing PKI (step-ca) is the root of trust.
type UpstreamSigner interface {
	// SignIntermediate signs a CA CSR. It returns the chain leaf first
	// (the new intermediate, then any upstream intermediates, excluding the
	// root) and the upstream roots, which become the bundle's X.509
	// authorities.
	SignIntermediate(ctx context.Context, csr *x509.CertificateRequest, ttl time.Duration) (chain, roots []*x509.Certificate, err error)
}
