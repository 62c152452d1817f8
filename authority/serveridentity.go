package authority

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/url"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ControlPlaneID is writd's own SPIFFE ID in a trust domain.
func ControlPlaneID(td spiffeid.TrustDomain) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/writ/control-plane")
}

// ServerIdentity is writd's own X.509 SVID (spiffe://<td>/writ/control-plane)
// for its TLS listeners. Its key is made here and never leaves the process;
// Run renews it at half life. Safe for concurrent use.
type ServerIdentity struct {
	signer Signer
	reg    *Registry
	id     spiffeid.ID
	clock  clockwork.Clock
	log    *slog.Logger
	cur    atomic.Pointer[tls.Certificate]
}

// NewServerIdentity issues the first control-plane SVID.
// Each issuance is recorded in reg's issuance log when reg is not nil.
func NewServerIdentity(ctx context.Context, signer Signer, reg *Registry, td spiffeid.TrustDomain, clock clockwork.Clock, log *slog.Logger) (*ServerIdentity, error) {
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &ServerIdentity{signer: signer, reg: reg, id: ControlPlaneID(td), clock: clock, log: log}
	if err := s.renew(ctx, OutcomeIssued); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *ServerIdentity) renew(ctx context.Context, outcome string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("control-plane key: %w", err)
	}
	u, _ := url.Parse(s.id.String())
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		return fmt.Errorf("control-plane csr: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return fmt.Errorf("control-plane csr: %w", err)
	}
	svid, err := s.signer.SignX509SVID(ctx, X509Request{CSR: csr, ID: s.id})
	if err != nil {
		return fmt.Errorf("control-plane svid: %w", err)
	}
	if s.reg != nil {
		if err := s.reg.RecordIssuance(ctx, Issuance{Kind: KindX509SVID, Outcome: outcome, Serial: svid.Serial, SPIFFEID: s.id.String(),
			NotAfter: svid.NotAfter, Caller: "writd", Signer: svid.Signer}); err != nil {
			return fmt.Errorf("control-plane svid: %w", err)
		}
	}
	cert := &tls.Certificate{PrivateKey: key, Leaf: svid.Chain[0]}
	for _, c := range svid.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	s.cur.Store(cert)
	s.log.Info("control-plane svid issued", "spiffe_id", s.id.String(), "serial", svid.Serial, "not_after", svid.NotAfter)
	return nil
}

// Certificate is the current control-plane SVID.
func (s *ServerIdentity) Certificate() *tls.Certificate { return s.cur.Load() }

// Run renews the SVID at half its life, retrying every few seconds after a
// failure while the current one is still valid.
func (s *ServerIdentity) Run(ctx context.Context) error {
	for {
		leaf := s.cur.Load().Leaf
		wait := leaf.NotAfter.Sub(leaf.NotBefore)/2 - s.clock.Since(leaf.NotBefore)
		select {
		case <-ctx.Done():
			return nil
		case <-s.clock.After(max(wait, 0)):
		}
		if err := s.renew(ctx, OutcomeRenewed); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.log.Error("renew control-plane svid", "error", err)
			select {
			case <-ctx.Done():
				return nil
			case <-s.clock.After(5 * time.Second):
			}
		}
	}
}

// TLSConfig is the server side of the node API: the control-plane SVID as
// server certificate, and client certificates optional (Attest has none)
// but verified against the current bundle when given. Certificate times are
// checked on the injected clock.
func (s *ServerIdentity) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			b, err := s.signer.Bundle(hello.Context())
			if err != nil {
				return nil, fmt.Errorf("bundle: %w", err)
			}
			pool := x509.NewCertPool()
			for _, c := range b.X509Authorities() {
				pool.AddCert(c)
			}
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{*s.cur.Load()},
				ClientAuth:   tls.VerifyClientCertIfGiven,
				ClientCAs:    pool,
				Time:         s.clock.Now,
			}, nil
		},
	}
}
