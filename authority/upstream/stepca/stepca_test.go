package stepca_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/upstream/stepca"
	"github.com/writmesh/writ/authority/upstream/stepca/stepcatest"
	"github.com/writmesh/writ/config"
)

var _ authority.UpstreamSigner = (*stepca.Client)(nil)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// caCSR is what writd sends upstream: a CA request whose only SAN is the
// trust domain's URI.
func caCSR(t *testing.T, key crypto.Signer) *x509.CertificateRequest {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{Organization: []string{"Writ"}, SerialNumber: "replica-1"},
		URIs:    []*url.URL{td.ID().URL()},
	}, key)
	if err != nil {
		t.Fatalf("create csr: %v", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatalf("parse csr: %v", err)
	}
	return csr
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newClient(t *testing.T, s *stepcatest.StepCA, opts stepca.Options) *stepca.Client {
	t.Helper()
	c, err := stepca.New(s.Config(), opts)
	if err != nil {
		t.Fatalf("stepca.New: %v", err)
	}
	return c
}

// noToken fails if err repeats any token step-ca has seen.
func noToken(t *testing.T, s *stepcatest.StepCA, err error) {
	t.Helper()
	for _, tok := range s.Tokens() {
		if strings.Contains(err.Error(), tok) {
			t.Fatal("error contains a one-time token")
		}
		// A JWT's signature part alone is as good as a leak.
		if parts := strings.Split(tok, "."); len(parts) == 3 && strings.Contains(err.Error(), parts[2]) {
			t.Fatal("error contains a token signature")
		}
	}
}

func TestSignIntermediateChainsToStepCARoot(t *testing.T) {
	s := stepcatest.Start(t)
	c := newClient(t, s, stepca.Options{})
	key := newKey(t)
	ttl := 24 * time.Hour
	before := time.Now()
	chain, roots, err := c.SignIntermediate(context.Background(), caCSR(t, key), ttl)
	if err != nil {
		t.Fatalf("SignIntermediate: %v", err)
	}
	if len(roots) != 1 || !roots[0].Equal(s.Root) {
		t.Fatalf("roots = %d certificates, want step-ca's root only", len(roots))
	}
	if len(chain) != 2 {
		t.Fatalf("chain has %d certificates, want 2 (writd's intermediate, step-ca's intermediate)", len(chain))
	}
	if !chain[1].Equal(s.Intermediate) {
		t.Errorf("chain[1] = %q, want step-ca's intermediate", chain[1].Subject)
	}
	inter := chain[0]
	if !inter.IsCA || !inter.BasicConstraintsValid {
		t.Errorf("intermediate is not a CA")
	}
	if inter.MaxPathLen != 0 || !inter.MaxPathLenZero {
		t.Errorf("intermediate maxPathLen = %d (zero %t), want 0", inter.MaxPathLen, inter.MaxPathLenZero)
	}
	if inter.KeyUsage&x509.KeyUsageCertSign == 0 || inter.KeyUsage&x509.KeyUsageCRLSign == 0 {
		t.Errorf("intermediate key usage = %b, want certSign and crlSign", inter.KeyUsage)
	}
	if len(inter.URIs) != 1 || inter.URIs[0].String() != "spiffe://example.org" {
		t.Errorf("intermediate URIs = %v, want [spiffe://example.org]", inter.URIs)
	}
	if got, want := inter.Subject.Organization, []string{"Writ"}; len(got) != 1 || got[0] != want[0] {
		t.Errorf("intermediate subject O = %v, want %v", got, want)
	}
	if !inter.PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Errorf("intermediate is not for the CSR's key")
	}
	// step-ca backdates NotBefore by a minute and counts ttl from now.
	if lo, hi := before.Add(ttl-time.Minute), time.Now().Add(ttl+time.Minute); inter.NotAfter.Before(lo) || inter.NotAfter.After(hi) {
		t.Errorf("intermediate NotAfter = %s, want about now+%s", inter.NotAfter, ttl)
	}
	pool := x509.NewCertPool()
	pool.AddCert(s.Root)
	inters := x509.NewCertPool()
	inters.AddCert(chain[1])
	if _, err := inter.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("intermediate does not chain to step-ca's root: %v", err)
	}

	// The intermediate signs an X.509 SVID that go-spiffe accepts with a
	// bundle holding only step-ca's root.
	id := spiffeid.RequireFromPath(td, "/ns/default/sa/web")
	leafKey := newKey(t)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}, inter, leafKey.Public(), key)
	if err != nil {
		t.Fatalf("sign leaf: %v", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	bundle := x509bundle.FromX509Authorities(td, roots)
	gotID, _, err := x509svid.Verify(append([]*x509.Certificate{leaf}, chain...), bundle)
	if err != nil {
		t.Fatalf("x509svid.Verify: %v", err)
	}
	if gotID != id {
		t.Errorf("verified ID = %s, want %s", gotID, id)
	}
}

func TestSignIntermediateTwiceUsesFreshTokens(t *testing.T) {
	s := stepcatest.Start(t)
	c := newClient(t, s, stepca.Options{})
	for i := range 2 {
		if _, _, err := c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour); err != nil {
			t.Fatalf("sign %d: %v", i, err)
		}
	}
	if toks := s.Tokens(); len(toks) != 2 || toks[0] == toks[1] {
		t.Fatalf("step-ca saw %d tokens (distinct: %t), want 2 distinct", len(toks), len(toks) == 2 && toks[0] != toks[1])
	}
}

func TestNewWrongPassword(t *testing.T) {
	s := stepcatest.Start(t)
	cfg := s.Config()
	cfg.ProvisionerPasswordFile = filepath.Join(t.TempDir(), "wrong")
	if err := os.WriteFile(cfg.ProvisionerPasswordFile, []byte("not-the-password\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := stepca.New(cfg, stepca.Options{})
	if err == nil {
		t.Fatal("New with a wrong password succeeded")
	}
	if !strings.Contains(err.Error(), "wrong password") || !strings.Contains(err.Error(), cfg.ProvisionerKeyFile) {
		t.Errorf("error = %q, want it to say wrong password and name the key file", err)
	}
}

func TestNewRejectsBadFiles(t *testing.T) {
	s := stepcatest.Start(t)
	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	plainJWK := write("plain.json", `{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA","d":"AAAA"}`)
	empty := write("empty", "\n")
	noCert := write("nocert.pem", "not pem")
	leafPEM := write("leaf.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: selfSignedLeaf(t).Raw})))
	tests := []struct {
		name string
		edit func(c *config.StepCA)
		want string
	}{
		{"http url", func(c *config.StepCA) { c.URL = strings.Replace(c.URL, "https", "http", 1) }, "https://"},
		{"no provisioner", func(c *config.StepCA) { c.Provisioner = "" }, "name is required"},
		{"missing root", func(c *config.StepCA) { c.RootFile = filepath.Join(dir, "absent") }, "root file"},
		{"root not pem", func(c *config.StepCA) { c.RootFile = noCert }, "no PEM certificate"},
		{"root not a CA", func(c *config.StepCA) { c.RootFile = leafPEM }, "is not a CA"},
		{"unencrypted key", func(c *config.StepCA) { c.ProvisionerKeyFile = plainJWK }, "not an encrypted JWK"},
		{"empty password", func(c *config.StepCA) { c.ProvisionerPasswordFile = empty }, "is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := s.Config()
			tt.edit(&cfg)
			_, err := stepca.New(cfg, stepca.Options{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestSignIntermediateUnreachable(t *testing.T) {
	s := stepcatest.Start(t)

	t.Run("connection refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		cfg := s.Config()
		cfg.URL = "https://" + addr
		c, err := stepca.New(cfg, stepca.Options{})
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour)
		if err == nil || !strings.Contains(err.Error(), addr) {
			t.Fatalf("error = %v, want one naming %s", err, addr)
		}
	})

	t.Run("no answer", func(t *testing.T) {
		// A peer that accepts connections and never speaks: only the
		// client's timeout ends the call.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		t.Cleanup(func() { close(done); ln.Close() })
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { <-done; conn.Close() }()
			}
		}()
		cfg := s.Config()
		cfg.URL = "https://" + ln.Addr().String()
		c, err := stepca.New(cfg, stepca.Options{Timeout: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no answer within 200ms") {
			t.Fatalf("error = %v, want a timeout after 200ms", err)
		}
	})

	t.Run("caller cancels", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		c := newClient(t, s, stepca.Options{})
		_, _, err := c.SignIntermediate(ctx, caCSR(t, newKey(t)), time.Hour)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("error = %v, want context.Canceled", err)
		}
	})
}

func TestSignIntermediateUntrustedTLS(t *testing.T) {
	s := stepcatest.Start(t)
	other := stepcatest.Start(t)
	cfg := s.Config()
	cfg.RootFile = other.RootFile // a root that did not issue s's TLS certificate
	c, err := stepca.New(cfg, stepca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour)
	var uerr x509.UnknownAuthorityError
	if !errors.As(err, &uerr) {
		t.Fatalf("error = %v, want an unknown authority TLS error", err)
	}
	if len(s.Tokens()) != 0 {
		t.Errorf("step-ca received %d tokens over an unverified connection", len(s.Tokens()))
	}
}

func TestSignIntermediateRefused(t *testing.T) {
	s := stepcatest.Start(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name        string
		provisioner string
		key         crypto.Signer
		ttl         time.Duration
		status      int
		want        string // in step-ca's message
	}{
		{"ttl above the provisioner's maximum", s.Provisioner, newKey(t), stepcatest.MaxCertDuration + 24*time.Hour, http.StatusForbidden, "duration"},
		{"rsa key too short", s.Provisioner, rsaKey, time.Hour, http.StatusForbidden, "2048"},
		{"unknown provisioner", "nobody", newKey(t), time.Hour, http.StatusUnauthorized, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := s.Config()
			cfg.Provisioner = tt.provisioner
			c, err := stepca.New(cfg, stepca.Options{})
			if err != nil {
				t.Fatal(err)
			}
			_, _, err = c.SignIntermediate(context.Background(), caCSR(t, tt.key), tt.ttl)
			var se *stepca.SignError
			if !errors.As(err, &se) {
				t.Fatalf("error = %v, want a *stepca.SignError", err)
			}
			if se.Status != tt.status || se.Message == "" || !strings.Contains(se.Message, tt.want) {
				t.Errorf("refusal = %d %q, want %d with a message containing %q", se.Status, se.Message, tt.status, tt.want)
			}
			if !strings.Contains(err.Error(), se.Message) || !strings.Contains(err.Error(), s.URL) {
				t.Errorf("error %q should carry step-ca's message and URL", err)
			}
			noToken(t, s, err)
		})
	}
	if len(s.Tokens()) != len(tests) {
		t.Errorf("step-ca saw %d tokens, want %d", len(s.Tokens()), len(tests))
	}
}

func TestSignIntermediateRefusesLeafCertificate(t *testing.T) {
	s := stepcatest.Start(t)
	cfg := s.Config()
	cfg.Provisioner = s.LeafProvisioner
	c, err := stepca.New(cfg, stepca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour)
	if err == nil || !strings.Contains(err.Error(), "not a CA") {
		t.Fatalf("error = %v, want a refusal of a non-CA certificate", err)
	}
	noToken(t, s, err)
}

func TestSignIntermediateRefusesPathLenZeroUpstream(t *testing.T) {
	s := stepcatest.StartWith(t, stepcatest.Options{PathLenZero: true})
	c := newClient(t, s, stepca.Options{})
	_, _, err := c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour)
	if err == nil || !strings.Contains(err.Error(), "maxPathLen") {
		t.Fatalf("error = %v, want a refusal naming maxPathLen", err)
	}
}

func TestSignIntermediateRedactsEchoedToken(t *testing.T) {
	// A misbehaving upstream that echoes the request into its error: the
	// client must not pass the token on. (A fake peer for this one error
	// path; the real step-ca never echoes it.)
	s := stepcatest.Start(t)
	var seen string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			OTT string `json:"ott"`
		}
		_ = jsonDecode(r, &body)
		seen = body.OTT
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_, _ = w.Write([]byte(`{"status":400,"message":"bad token ` + body.OTT + "\\nsecond line" + `"}`))
	}))
	defer srv.Close()
	rootFile := filepath.Join(t.TempDir(), "root.pem")
	if err := os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := s.Config()
	cfg.URL, cfg.RootFile = srv.URL, rootFile
	c, err := stepca.New(cfg, stepca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour)
	if err == nil || seen == "" {
		t.Fatalf("error = %v, token seen %t", err, seen != "")
	}
	if strings.Contains(err.Error(), seen) || strings.Contains(err.Error(), "\n") {
		t.Fatal("error carries the echoed token or a raw newline")
	}
	if !strings.Contains(err.Error(), "bad token [token]") {
		t.Errorf("error = %q, want step-ca's message with the token redacted", err)
	}
}

// TestDependencies keeps step-ca's server out of writd: the client package
// may use go.step.sm/crypto but no package of github.com/smallstep/certificates.
func TestDependencies(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go tool not found: %v", err)
	}
	out, err := exec.Command(gobin, "list", "-deps", "github.com/writmesh/writ/authority/upstream/stepca").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	pkgs := strings.Fields(string(out))
	var stepCrypto int
	for _, p := range pkgs {
		if strings.HasPrefix(p, "github.com/smallstep/certificates") {
			t.Errorf("stepca depends on %s", p)
		}
		if strings.HasPrefix(p, "go.step.sm/crypto") {
			stepCrypto++
		}
	}
	if stepCrypto == 0 {
		t.Errorf("go list found no go.step.sm/crypto package: is the check looking at the right package?")
	}
	t.Logf("stepca depends on %d packages", len(pkgs))
}

func jsonDecode(r *http.Request, v any) error {
	return json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(v)
}

func selfSignedLeaf(t *testing.T) *x509.Certificate {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "not a CA"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}
