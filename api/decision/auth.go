package decision

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/writmesh/writ/authority/svidtls"
)

// maxTokenLen bounds a bearer token before it is parsed.
const maxTokenLen = 8 << 10

// How a caller authenticated.
const (
	AuthX509 = "x509"
	AuthJWT  = "jwt"
)

// Caller is an authenticated caller of the API.
type Caller struct {
	ID   spiffeid.ID
	Auth string // AuthX509 or AuthJWT
}

// input is the caller as the policies see it: input.caller of the admin
// policy, input.writ.caller of AuthZEN evaluations.
func (c Caller) input() map[string]any {
	m := map[string]any{
		"spiffe_id":    c.ID.String(),
		"trust_domain": c.ID.TrustDomain().Name(),
		"path":         c.ID.Path(),
		"auth":         c.Auth,
	}
	// The Istio form spiffe://td/ns/<namespace>/sa/<service account>.
	if seg := strings.Split(strings.TrimPrefix(c.ID.Path(), "/"), "/"); len(seg) == 4 && seg[0] == "ns" && seg[2] == "sa" {
		m["namespace"], m["service_account"] = seg[1], seg[3]
	}
	return m
}

// authenticate finds the caller: the X.509 SVID of the TLS peer, verified
// against the bundle at the server's clock, or a JWT-SVID bearer token,
// verified against the bundle (go-spiffe checks its expiry on the wall
// clock) for one of the configured audiences. A caller presenting both
// must present the same identity in both. Bearer tokens are refused
// outside TLS, where they could be read on the wire.
func (s *Server) authenticate(r *http.Request) (Caller, error) {
	var (
		c       Caller
		hasX509 bool
	)
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		certs, now := r.TLS.PeerCertificates, s.clock.Now()
		id, ok := s.authCache.x509Lookup(certs, s.x509, now)
		if !ok {
			var chains [][]*x509.Certificate
			var err error
			id, chains, err = x509svid.Verify(certs, s.x509, x509svid.WithTime(now))
			if err != nil {
				return Caller{}, errors.New("client certificate is not a valid X.509 SVID of a trusted domain")
			}
			s.authCache.x509Store(certs, id, chains[0])
		}
		c, hasX509 = Caller{ID: id, Auth: AuthX509}, true
	}
	authz := r.Header.Values("Authorization")
	if len(authz) == 0 {
		if !hasX509 {
			return Caller{}, errors.New("authentication required: present an X.509 SVID (mutual TLS) or a JWT-SVID as a bearer token")
		}
		return c, nil
	}
	if len(authz) > 1 {
		return Caller{}, errors.New("more than one Authorization header")
	}
	scheme, tok, ok := strings.Cut(authz[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return Caller{}, errors.New("Authorization must be a Bearer token")
	}
	if r.TLS == nil {
		return Caller{}, errors.New("bearer tokens are accepted only over TLS")
	}
	if len(tok) > maxTokenLen {
		return Caller{}, fmt.Errorf("bearer token longer than %d bytes", maxTokenLen)
	}
	// go-spiffe checks expiry on the wall clock; so does the cache.
	id, ok := s.authCache.jwtLookup(tok, s.jwt, time.Now())
	if !ok {
		svid, err := jwtsvid.ParseAndValidate(tok, s.jwt, s.audience)
		if err != nil {
			// go-spiffe's messages name the failed check, never the token.
			return Caller{}, fmt.Errorf("bearer token is not a valid JWT-SVID: %v", err)
		}
		id = svid.ID
		s.authCache.jwtStore(tok, id, svid.Expiry)
	}
	if hasX509 && id != c.ID {
		return Caller{}, errors.New("the client certificate and the bearer token name different SPIFFE IDs")
	}
	if hasX509 {
		return c, nil
	}
	return Caller{ID: id, Auth: AuthJWT}, nil
}

// TLSConfig is a server configuration for the API on its own listener:
// it presents svid and asks for, but does not require, a client SVID, so
// that callers with a bearer token can connect too. A client certificate
// that is sent must verify against bundle at the clock's time, or the
// handshake fails; the handler verifies it again before trusting it.
func TLSConfig(svid x509svid.Source, bundle x509bundle.Source, clock clockwork.Clock) *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: tlsconfig.GetCertificate(svid),
		ClientAuth:     tls.RequestClientCert,
		VerifyPeerCertificate: func(raw [][]byte, chains [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return nil
			}
			return svidtls.Verify(bundle, nil, clock)(raw, chains)
		},
		NextProtos: []string{"h2", "http/1.1"},
	}
}
