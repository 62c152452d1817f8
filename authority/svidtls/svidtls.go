// Package svidtls builds TLS configurations that authenticate both ends
// with X.509 SVIDs, like go-spiffe's tlsconfig, but check certificate
// validity on an injected clock. Writ's components take a clock so that
// rotation can be tested by moving time; with go-spiffe's configs (which
// use the wall clock) a certificate issued at a moved time would look not
// yet valid.
//
// The configurations are safe for concurrent use; the sources they read
// may change underneath them (rotation), and each handshake sees the
// current SVID and bundle.
package svidtls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Authorizer decides whether an authenticated peer may talk to us.
type Authorizer func(id spiffeid.ID) error

// AuthorizeID accepts exactly one SPIFFE ID.
func AuthorizeID(want spiffeid.ID) Authorizer {
	return func(id spiffeid.ID) error {
		if id != want {
			return fmt.Errorf("peer is %s, want %s", id, want)
		}
		return nil
	}
}

// AuthorizeMemberOf accepts any ID of a trust domain.
func AuthorizeMemberOf(td spiffeid.TrustDomain) Authorizer {
	return func(id spiffeid.ID) error {
		if !id.MemberOf(td) {
			return fmt.Errorf("peer %s is not a member of %s", id, td)
		}
		return nil
	}
}

// ClientConfig authenticates the server by its SVID against bundle at the
// clock's time. svid may be nil for a client without a certificate.
func ClientConfig(svid x509svid.Source, bundle x509bundle.Source, authz Authorizer, clock clockwork.Clock) *tls.Config {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Standard verification knows nothing of SPIFFE IDs or our clock;
		// VerifyPeerCertificate does all of it.
		InsecureSkipVerify:    true, //nolint:gosec // verified below
		VerifyPeerCertificate: Verify(bundle, authz, clock),
	}
	if svid != nil {
		cfg.GetClientCertificate = tlsconfig.GetClientCertificate(svid)
	}
	return cfg
}

// ServerConfig presents svid and requires and verifies a client SVID.
func ServerConfig(svid x509svid.Source, bundle x509bundle.Source, authz Authorizer, clock clockwork.Clock) *tls.Config {
	return &tls.Config{
		MinVersion:            tls.VersionTLS12,
		GetCertificate:        tlsconfig.GetCertificate(svid),
		ClientAuth:            tls.RequireAnyClientCert,
		VerifyPeerCertificate: Verify(bundle, authz, clock),
	}
}

// Verify returns a VerifyPeerCertificate function checking the peer's
// chain against bundle at the clock's time, then authorizing its ID.
func Verify(bundle x509bundle.Source, authz Authorizer, clock clockwork.Clock) func([][]byte, [][]*x509.Certificate) error {
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("peer presented no certificate")
		}
		certs := make([]*x509.Certificate, 0, len(raw))
		for _, der := range raw {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				return fmt.Errorf("peer certificate: %w", err)
			}
			certs = append(certs, c)
		}
		id, _, err := x509svid.Verify(certs, bundle, x509svid.WithTime(clock.Now()))
		if err != nil {
			return fmt.Errorf("peer svid: %w", err)
		}
		if authz != nil {
			if err := authz(id); err != nil {
				return fmt.Errorf("peer not authorized: %w", err)
			}
		}
		return nil
	}
}

// PeerID returns the SPIFFE ID of the peer of a finished handshake.
func PeerID(state tls.ConnectionState) (spiffeid.ID, error) {
	if len(state.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("no peer certificate")
	}
	return x509svid.IDFromCert(state.PeerCertificates[0])
}
