package authority

// Temporary until the CA core lands: the same contract as its ParseCSR.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func ParseCSR(der []byte) (*x509.CertificateRequest, error) {
	if len(der) == 0 || len(der) > 8192 {
		return nil, fmt.Errorf("csr size")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("parse csr: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	k, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || k.Curve != elliptic.P256() {
		return nil, fmt.Errorf("p256 only")
	}
	return csr, nil
}

func CheckCSRFor(csr *x509.CertificateRequest, id spiffeid.ID) error {
	if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 || len(csr.URIs) > 1 {
		return fmt.Errorf("sans")
	}
	if len(csr.URIs) == 1 && csr.URIs[0].String() != id.String() {
		return fmt.Errorf("uri")
	}
	return nil
}

type RootRotation struct{ Phase string }
