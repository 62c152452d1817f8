package authority

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxCSRSize bounds a DER certificate request. A P-256 CSR with one URI
// SAN is about 300 bytes; 8 KiB leaves room and keeps parsing cheap.
const MaxCSRSize = 8 << 10

// ParseCSR parses a DER certificate request from an untrusted caller,
// checks its self-signature (proof that the caller holds the private key)
// and accepts only ECDSA P-256 keys. Its errors are safe to return to the
// caller. It is safe for concurrent use.
func ParseCSR(der []byte) (*x509.CertificateRequest, error) {
	if len(der) == 0 {
		return nil, fmt.Errorf("csr is empty")
	}
	if len(der) > MaxCSRSize {
		return nil, fmt.Errorf("csr is %d bytes, more than the %d allowed", len(der), MaxCSRSize)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("csr does not parse: %w", err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("csr key is %s: only ECDSA P-256 keys are accepted", keyKind(csr.PublicKey))
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("csr signature does not verify: %w", err)
	}
	return csr, nil
}

func keyKind(pub any) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case nil:
		return "missing or of an unknown algorithm"
	default:
		return fmt.Sprintf("%T", pub)
	}
}

// CheckCSRFor checks that a CSR asks for nothing beyond id: it may carry no
// SAN at all or exactly one URI SAN equal to id. DNS, IP and email SANs and
// any other URI are refused, because the CA would never put them in the
// certificate and a caller asking for them is confused or probing. It is
// safe for concurrent use.
func CheckCSRFor(csr *x509.CertificateRequest, id spiffeid.ID) error {
	if csr == nil {
		return fmt.Errorf("csr is missing")
	}
	if len(csr.DNSNames) > 0 {
		return fmt.Errorf("csr asks for DNS names %q: SVIDs carry only a SPIFFE ID URI SAN", csr.DNSNames)
	}
	if len(csr.IPAddresses) > 0 {
		return fmt.Errorf("csr asks for IP addresses %v: SVIDs carry only a SPIFFE ID URI SAN", csr.IPAddresses)
	}
	if len(csr.EmailAddresses) > 0 {
		return fmt.Errorf("csr asks for email addresses: SVIDs carry only a SPIFFE ID URI SAN")
	}
	switch len(csr.URIs) {
	case 0:
		return nil
	case 1:
		if csr.URIs[0].String() != id.String() {
			return fmt.Errorf("csr asks for URI SAN %q, but this caller may only get %q", csr.URIs[0].String(), id.String())
		}
		return nil
	default:
		return fmt.Errorf("csr asks for %d URI SANs: at most one, the SPIFFE ID %q, is allowed", len(csr.URIs), id.String())
	}
}
