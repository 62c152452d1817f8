package authority

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"math/big"
	"time"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// The leaf encoder below writes exactly the DER that x509.CreateCertificate
// writes for the SVID template (TestLeafDERMatchesCreateCertificate keeps
// the two byte-identical). It exists because CreateCertificate verifies
// every signature it makes, which costs as much as the signing itself and
// would leave the CA short of its throughput goal; the signature is instead
// checked by that test and by every test that verifies an SVID.

var (
	oidECDSAWithSHA256   = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidExtKeyUsage       = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidKeyUsage          = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidBasicConstraints  = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidAuthorityKeyID    = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidSubjectAltName    = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidServerAuth        = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	oidClientAuth        = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}
	keyUsageDigitalSigBS = asn1.BitString{Bytes: []byte{0x80}, BitLength: 1}
)

// leafSpec is what varies between X.509 SVIDs.
type leafSpec struct {
	serial              *big.Int
	notBefore, notAfter time.Time
	spki                []byte // DER SubjectPublicKeyInfo
	uri                 string
}

// signLeaf builds and signs an X.509 SVID: empty subject, the SPIFFE ID as
// the only (critical) SAN, digitalSignature key usage, server and client
// auth, not a CA, issued by inter with ECDSA-SHA256.
func signLeaf(spec leafSpec, inter *x509.Certificate, key *ecdsa.PrivateKey) ([]byte, error) {
	tbs, err := leafTBS(spec, inter)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(tbs)
	sig, err := ecdsa.SignASN1(rand.Reader, key, sum[:])
	if err != nil {
		return nil, fmt.Errorf("sign leaf: %w", err)
	}
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbs)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { b.AddASN1ObjectIdentifier(oidECDSAWithSHA256) })
		b.AddASN1BitString(sig)
	})
	return b.Bytes()
}

func leafTBS(spec leafSpec, inter *x509.Certificate) ([]byte, error) {
	keyUsage, err := asn1.Marshal(keyUsageDigitalSigBS)
	if err != nil {
		return nil, err
	}
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1(cbasn1.Tag(0).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) { b.AddASN1Int64(2) })
		b.AddASN1BigInt(spec.serial)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { b.AddASN1ObjectIdentifier(oidECDSAWithSHA256) })
		b.AddBytes(inter.RawSubject)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
			addTime(b, spec.notBefore)
			addTime(b, spec.notAfter)
		})
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {}) // empty subject
		b.AddBytes(spec.spki)
		b.AddASN1(cbasn1.Tag(3).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
				addExt(b, oidKeyUsage, true, func(b *cryptobyte.Builder) { b.AddBytes(keyUsage) })
				addExt(b, oidExtKeyUsage, false, func(b *cryptobyte.Builder) {
					b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
						b.AddASN1ObjectIdentifier(oidServerAuth)
						b.AddASN1ObjectIdentifier(oidClientAuth)
					})
				})
				addExt(b, oidBasicConstraints, true, func(b *cryptobyte.Builder) {
					b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {})
				})
				if len(inter.SubjectKeyId) > 0 {
					addExt(b, oidAuthorityKeyID, false, func(b *cryptobyte.Builder) {
						b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
							b.AddASN1(cbasn1.Tag(0).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes(inter.SubjectKeyId) })
						})
					})
				}
				// Critical because the subject is empty (RFC 5280 4.2.1.6).
				addExt(b, oidSubjectAltName, true, func(b *cryptobyte.Builder) {
					b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
						b.AddASN1(cbasn1.Tag(6).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes([]byte(spec.uri)) })
					})
				})
			})
		})
	})
	der, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("encode leaf: %w", err)
	}
	return der, nil
}

func addExt(b *cryptobyte.Builder, oid asn1.ObjectIdentifier, critical bool, value func(*cryptobyte.Builder)) {
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1ObjectIdentifier(oid)
		if critical {
			b.AddASN1Boolean(true)
		}
		b.AddASN1(cbasn1.OCTET_STRING, value)
	})
}

// addTime encodes a validity time as RFC 5280 requires: UTCTime through
// 2049, GeneralizedTime after.
func addTime(b *cryptobyte.Builder, t time.Time) {
	t = t.UTC()
	if t.Year() >= 1950 && t.Year() < 2050 {
		b.AddASN1UTCTime(t)
	} else {
		b.AddASN1GeneralizedTime(t)
	}
}
