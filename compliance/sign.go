package compliance

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"time"
)

// SignatureFormat is the version tag of detached signatures.
const SignatureFormat = "writ-report-signature/v1"

// ControlPlanePath is the SPIFFE ID path of writd, the only identity
// whose signature on a report is accepted.
const ControlPlanePath = "/writ/control-plane"

// MaxSignatureSize bounds a signature file read by VerifySignature.
const MaxSignatureSize = 64 << 10

// Signature is a detached signature file (FILE.sig), JSON. The signature
// covers SignedText: the file's SHA-256 and size, the signing time and
// the signer, so any changed byte of the file, or of those fields, fails
// verification.
type Signature struct {
	Format    string    `json:"format"`
	Algorithm string    `json:"algorithm"` // ECDSA-P256-SHA256
	SHA256    string    `json:"sha256"`    // hex, of the exported file
	Size      int64     `json:"size"`
	SignedAt  time.Time `json:"signed_at"`
	Signer    string    `json:"signer"` // the signer's SPIFFE ID
	// Signature is ASN.1 ECDSA over SHA-256(SignedText), base64 (JSON
	// []byte).
	Signature []byte `json:"signature"`
	// CertChain is the signer's X.509 SVID chain, leaf first, DER (base64
	// in JSON).
	CertChain [][]byte `json:"cert_chain"`
}

// SignedText is the exact byte string a signature covers.
func (s *Signature) SignedText() []byte {
	return fmt.Appendf(nil, "%s\nsha256 %s\nsize %d\nsigned_at %s\nsigner %s\n",
		SignatureFormat, s.SHA256, s.Size, s.SignedAt.UTC().Format(time.RFC3339Nano), s.Signer)
}

// Sign makes the detached signature of data with cert (writd's
// control-plane SVID: its chain and its private key, which signs in place
// and never leaves the process).
func Sign(data []byte, cert *tls.Certificate, now time.Time) ([]byte, error) {
	if cert == nil || len(cert.Certificate) == 0 {
		return nil, errors.New("sign report: no control-plane certificate")
	}
	signer, ok := cert.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("sign report: the control-plane key cannot sign")
	}
	if _, ok := signer.Public().(*ecdsa.PublicKey); !ok {
		return nil, errors.New("sign report: the control-plane key is not ECDSA")
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("sign report: %w", err)
	}
	id, err := spiffeID(leaf)
	if err != nil {
		return nil, fmt.Errorf("sign report: %w", err)
	}
	sum := sha256.Sum256(data)
	s := &Signature{Format: SignatureFormat, Algorithm: "ECDSA-P256-SHA256", SHA256: hex.EncodeToString(sum[:]),
		Size: int64(len(data)), SignedAt: now.UTC().Truncate(time.Second), Signer: id.String(), CertChain: cert.Certificate}
	digest := sha256.Sum256(s.SignedText())
	if s.Signature, err = signer.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		return nil, fmt.Errorf("sign report: %w", err)
	}
	out, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

// ErrSignature marks a signature that does not verify.
var ErrSignature = errors.New("signature does not verify")

// VerifySignature checks that sig is writd's signature over data: the
// file's hash and size match, the signer's chain verifies against roots
// (the trust bundle's X.509 authorities) at the signing time (SVIDs live
// an hour; reports are checked for years), the signer is a control-plane
// identity (trustDomain's, when given), and the ECDSA signature holds.
func VerifySignature(data, sig []byte, roots *x509.CertPool, trustDomain string) (*Signature, error) {
	if len(sig) > MaxSignatureSize {
		return nil, fmt.Errorf("%w: signature file larger than %d bytes", ErrSignature, MaxSignatureSize)
	}
	var s Signature
	dec := json.NewDecoder(bytes.NewReader(sig))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("%w: unreadable signature file: %v", ErrSignature, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: trailing data after the signature", ErrSignature)
	}
	if s.Format != SignatureFormat {
		return nil, fmt.Errorf("%w: format %q, want %q", ErrSignature, s.Format, SignatureFormat)
	}
	sum := sha256.Sum256(data)
	if s.SHA256 != hex.EncodeToString(sum[:]) || s.Size != int64(len(data)) {
		return &s, fmt.Errorf("%w: the file is not the one signed (SHA-256 or size differs: modified or truncated)", ErrSignature)
	}
	if len(s.CertChain) == 0 {
		return &s, fmt.Errorf("%w: no signer certificate", ErrSignature)
	}
	var certs []*x509.Certificate
	for _, der := range s.CertChain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return &s, fmt.Errorf("%w: unparseable signer certificate: %v", ErrSignature, err)
		}
		certs = append(certs, c)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	leaf := certs[0]
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: s.SignedAt,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return &s, fmt.Errorf("%w: the signer's certificate does not chain to the trust bundle: %v", ErrSignature, err)
	}
	id, err := spiffeID(leaf)
	if err != nil {
		return &s, fmt.Errorf("%w: %v", ErrSignature, err)
	}
	if id.Path != ControlPlanePath || (trustDomain != "" && id.Host != trustDomain) || id.String() != s.Signer {
		return &s, fmt.Errorf("%w: signed by %s, not by writd's control plane", ErrSignature, id)
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	digest := sha256.Sum256(s.SignedText())
	if !ok || !ecdsa.VerifyASN1(pub, digest[:], s.Signature) {
		return &s, fmt.Errorf("%w: bad signature (signature file altered?)", ErrSignature)
	}
	return &s, nil
}

// spiffeID is the single spiffe:// URI SAN of an SVID.
func spiffeID(c *x509.Certificate) (*url.URL, error) {
	if len(c.URIs) != 1 || c.URIs[0].Scheme != "spiffe" || c.URIs[0].Host == "" {
		return nil, errors.New("the signer certificate is not an X.509 SVID")
	}
	return c.URIs[0], nil
}
