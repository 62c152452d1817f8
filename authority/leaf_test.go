package authority

import (
	"bytes"
	"crypto/rand"
	"crypto/x509"
	"net/url"
	"testing"
	"time"
)

// TestLeafDERMatchesCreateCertificate: the hand-written leaf encoder must
// produce exactly the TBS certificate x509.CreateCertificate produces for
// the same SVID template, and a signature that verifies.
func TestLeafDERMatchesCreateCertificate(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	ca := newCA(t, pool, clk, "a", testKEK(t), nil)
	inter := ca.inter
	noSKI := *inter.cert
	noSKI.SubjectKeyId = nil
	key, _ := newCSR(t)
	spki, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	now := clk.Now()
	for _, tc := range []struct {
		name                string
		parent              *x509.Certificate
		notBefore, notAfter time.Time
	}{
		{"typical", inter.cert, now.Add(-backdate), now.Add(time.Hour)},
		{"parent without subject key id", &noSKI, now, now.Add(time.Minute)},
		{"generalized time after 2049", inter.cert, now, time.Date(2051, 3, 4, 5, 6, 7, 0, time.UTC)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			serial, err := randomSerial()
			if err != nil {
				t.Fatal(err)
			}
			id := workloadID("web")
			got, err := signLeaf(leafSpec{serial: serial, notBefore: tc.notBefore, notAfter: tc.notAfter, spki: spki, uri: id.String()}, tc.parent, inter.key)
			if err != nil {
				t.Fatal(err)
			}
			u, _ := url.Parse(id.String())
			tmpl := &x509.Certificate{
				SerialNumber:          serial,
				NotBefore:             tc.notBefore,
				NotAfter:              tc.notAfter,
				KeyUsage:              x509.KeyUsageDigitalSignature,
				ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
				BasicConstraintsValid: true,
				URIs:                  []*url.URL{u},
			}
			wantDER, err := x509.CreateCertificate(rand.Reader, tmpl, tc.parent, key.Public(), inter.key)
			if err != nil {
				t.Fatal(err)
			}
			want, _ := x509.ParseCertificate(wantDER)
			leaf, err := x509.ParseCertificate(got)
			if err != nil {
				t.Fatalf("parse hand-built leaf: %v", err)
			}
			if !bytes.Equal(leaf.RawTBSCertificate, want.RawTBSCertificate) {
				t.Fatalf("TBS differs from CreateCertificate's:\n got %x\nwant %x", leaf.RawTBSCertificate, want.RawTBSCertificate)
			}
			if err := leaf.CheckSignatureFrom(inter.cert); err != nil {
				t.Fatalf("signature: %v", err)
			}
		})
	}
}
