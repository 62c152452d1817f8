package authority

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/config"
)

func csrDER(t testing.TB, key any, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestParseCSRAndCheckCSRFor(t *testing.T) {
	id := workloadID("web")
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	uri := func(s string) []*url.URL { u, _ := url.Parse(s); return []*url.URL{u} }
	good := csrDER(t, p256, &x509.CertificateRequest{URIs: uri(id.String())})
	badSig := bytes.Clone(good)
	badSig[len(badSig)-5] ^= 0xff

	tests := []struct {
		name     string
		der      []byte
		parseErr string // substring; empty means ParseCSR succeeds
		checkErr string // substring; empty means CheckCSRFor succeeds
	}{
		{name: "matching URI SAN", der: good},
		{name: "no SAN", der: csrDER(t, p256, &x509.CertificateRequest{})},
		{name: "bad signature", der: badSig, parseErr: "signature"},
		{name: "RSA key", der: csrDER(t, rsaKey, &x509.CertificateRequest{}), parseErr: "only ECDSA P-256"},
		{name: "P-384 key", der: csrDER(t, p384, &x509.CertificateRequest{}), parseErr: "only ECDSA P-256"},
		{name: "empty", der: nil, parseErr: "empty"},
		{name: "garbage", der: []byte("not a csr"), parseErr: "does not parse"},
		{name: "oversized", der: make([]byte, MaxCSRSize+1), parseErr: "more than"},
		{name: "trailing data", der: append(bytes.Clone(good), 0), parseErr: "does not parse"},
		{name: "wrong URI SAN", der: csrDER(t, p256, &x509.CertificateRequest{URIs: uri("spiffe://example.org/ns/default/sa/admin")}), checkErr: "may only get"},
		{name: "two URI SANs", der: csrDER(t, p256, &x509.CertificateRequest{URIs: append(uri(id.String()), uri("spiffe://example.org/x")...)}), checkErr: "2 URI SANs"},
		{name: "DNS SAN", der: csrDER(t, p256, &x509.CertificateRequest{URIs: uri(id.String()), DNSNames: []string{"web.example.org"}}), checkErr: "DNS"},
		{name: "IP SAN", der: csrDER(t, p256, &x509.CertificateRequest{IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}), checkErr: "IP"},
		{name: "email SAN", der: csrDER(t, p256, &x509.CertificateRequest{EmailAddresses: []string{"a@example.org"}}), checkErr: "email"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			csr, err := ParseCSR(tc.der)
			if tc.parseErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.parseErr) {
					t.Fatalf("ParseCSR err = %v, want one containing %q", err, tc.parseErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseCSR: %v", err)
			}
			err = CheckCSRFor(csr, id)
			if tc.checkErr == "" && err != nil {
				t.Fatalf("CheckCSRFor: %v", err)
			}
			if tc.checkErr != "" && (err == nil || !strings.Contains(err.Error(), tc.checkErr)) {
				t.Fatalf("CheckCSRFor err = %v, want one containing %q", err, tc.checkErr)
			}
		})
	}
}

func FuzzParseCSR(f *testing.F) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org/ns/default/sa/web")
	f.Add(csrDER(f, p256, &x509.CertificateRequest{URIs: []*url.URL{u}}))
	f.Add(csrDER(f, p256, &x509.CertificateRequest{DNSNames: []string{"a.b"}, IPAddresses: []net.IP{net.IPv6loopback}}))
	f.Add([]byte{0x30, 0x82, 0xff, 0xff})
	f.Add([]byte{})
	id := spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web")
	f.Fuzz(func(t *testing.T, der []byte) {
		csr, err := ParseCSR(der)
		if err != nil {
			if csr != nil {
				t.Fatal("csr returned with an error")
			}
			return
		}
		if err := csr.CheckSignature(); err != nil {
			t.Fatalf("accepted a csr whose signature does not verify: %v", err)
		}
		_ = CheckCSRFor(csr, id)
	})
}

func TestKEK(t *testing.T) {
	k, err := GenerateKEK()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "kek")
	if err := os.WriteFile(file, []byte(k+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fromFile, err := LoadKEK(file, nil)
	if err != nil || len(fromFile) != 32 {
		t.Fatalf("LoadKEK(file) = %d bytes, %v", len(fromFile), err)
	}
	env := func(v string) func(string) string {
		return func(name string) string {
			if name == EnvKEK {
				return v
			}
			return ""
		}
	}
	fromEnv, err := LoadKEK("", env(k))
	if err != nil || !bytes.Equal(fromEnv, fromFile) {
		t.Fatalf("LoadKEK(env) = %v, want the same key as the file", err)
	}
	for name, c := range map[string]struct {
		file string
		env  string
		want string
	}{
		"none":         {want: "no key-encryption key"},
		"short":        {env: "c2hvcnQ=", want: "got 5 bytes"},
		"not base64":   {env: "!!!", want: "not base64"},
		"missing file": {file: filepath.Join(t.TempDir(), "nope"), want: "no such file"},
	} {
		if _, err := LoadKEK(c.file, env(c.env)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want %q", name, err, c.want)
		}
	}
	// Sealed keys are bound to their root id.
	sealed, err := seal(fromFile, rootAAD("root-a"), []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unseal(fromFile, rootAAD("root-b"), "root key root-b", sealed); err == nil {
		t.Fatal("sealed key opened under another root id")
	}
	if got, err := unseal(fromFile, rootAAD("root-a"), "root key root-a", sealed); err != nil || string(got) != "secret" {
		t.Fatalf("unseal = %q, %v", got, err)
	}
}

// BenchmarkSignX509SVID measures what the node API does per X.509 SVID in
// process: parse and check the CSR, then sign. The goal is at least 5,000
// SVIDs/s on one core (go test -bench SignX509SVID -cpu 1).
func BenchmarkSignX509SVID(b *testing.B) {
	pool := newPool(b)
	ca := newCA(b, pool, clockwork.NewRealClock(), "bench", testKEK(b), func(o *Options) {
		o.Config.X509SVIDTTL = config.Duration(config.DefaultX509SVIDTTL)
	})
	id := workloadID("bench")
	_, der := newCSR(b, id.String())
	ctx := ctxT(b)
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime(b)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			csr, err := ParseCSR(der)
			if err != nil {
				b.Fatal(err)
			}
			if err := CheckCSRFor(csr, id); err != nil {
				b.Fatal(err)
			}
			if _, err := ca.SignX509SVID(ctx, X509Request{CSR: csr, ID: id}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "svids/s")
	// The machine is shared: CPU time spent by this process, not wall
	// time, gives the per-core rate regardless of other load.
	b.ReportMetric(float64(b.N)/(cpuTime(b)-cpu0).Seconds(), "svids/cpu-s")
}

// cpuTime is the user and system CPU time this process has used.
func cpuTime(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
