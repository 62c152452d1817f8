package stepca_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.step.sm/crypto/jose"

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

func TestHealth(t *testing.T) {
	s := stepcatest.Start(t)
	if err := newClient(t, s, stepca.Options{}).Health(context.Background()); err != nil {
		t.Fatalf("Health: %v", err)
	}
	cfg := s.Config()
	cfg.RootFile = stepcatest.Start(t).RootFile
	c, err := stepca.New(cfg, stepca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var uerr x509.UnknownAuthorityError
	if err := c.Health(context.Background()); !errors.As(err, &uerr) {
		t.Fatalf("Health against an untrusted step-ca = %v, want an unknown authority error", err)
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

// TestNewReadsJWEJSONSerialization accepts the key as `step crypto jwk
// create` writes it: a JWE in JSON serialization rather than compact.
func TestNewReadsJWEJSONSerialization(t *testing.T) {
	s := stepcatest.Start(t)
	compact, err := os.ReadFile(s.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := jose.ParseEncrypted(string(compact))
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.Config()
	cfg.ProvisionerKeyFile = filepath.Join(t.TempDir(), "priv.json")
	if err := os.WriteFile(cfg.ProvisionerKeyFile, []byte(enc.FullSerialize()), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := stepca.New(cfg, stepca.Options{})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if _, _, err := c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour); err != nil {
		t.Fatalf("SignIntermediate: %v", err)
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
	interPEM := write("inter.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Intermediate.Raw})))
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
		{"intermediate as root", func(c *config.StepCA) { c.RootFile = interPEM }, "not self-signed"},
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

// TestSignIntermediateBadUpstreamAnswers covers answers the real step-ca
// does not give: a peer that echoes the token, floods, redirects or sends
// junk. The fake peer stands in for step-ca only in this table; the client
// must fail closed and never repeat the token.
func TestSignIntermediateBadUpstreamAnswers(t *testing.T) {
	s := stepcatest.Start(t)
	other := stepcatest.Start(t) // a certificate chain that is not the CSR's
	otherChain, _, err := newClient(t, other, stepca.Options{}).SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := func(c *x509.Certificate) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	tests := []struct {
		name  string
		reply func(w http.ResponseWriter, ott string)
		want  string
	}{
		{"echoes the token", func(w http.ResponseWriter, ott string) {
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"status":400,"message":"bad token ` + ott + `\nsecond line"}`))
		}, "bad token [token] second line"},
		{"floods", func(w http.ResponseWriter, _ string) {
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write([]byte(`{"crt":"` + strings.Repeat("A", 2<<20) + `"}`))
		}, "larger than"},
		{"redirects", func(w http.ResponseWriter, _ string) {
			w.Header().Set("Location", "https://127.0.0.1:1/1.0/sign")
			w.WriteHeader(http.StatusTemporaryRedirect)
		}, "HTTP 307"},
		{"junk", func(w http.ResponseWriter, _ string) {
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write([]byte(`<html>`))
		}, "decode response"},
		{"not a certificate", func(w http.ResponseWriter, _ string) {
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write([]byte(`{"crt":"hello","certChain":["hello"]}`))
		}, "not one PEM certificate"},
		{"too many certificates", func(w http.ResponseWriter, _ string) {
			w.WriteHeader(http.StatusCreated)
			chain, _ := json.Marshal(slices.Repeat([]string{certPEM(otherChain[0])}, 9))
			_, _ = w.Write([]byte(`{"certChain":` + string(chain) + `}`))
		}, "more than 8"},
		{"someone else's certificate", func(w http.ResponseWriter, _ string) {
			w.WriteHeader(http.StatusCreated)
			chain, _ := json.Marshal([]string{certPEM(otherChain[0]), certPEM(otherChain[1])})
			_, _ = w.Write([]byte(`{"certChain":` + string(chain) + `}`))
		}, "not for the requested key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var seen string
			srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				var body struct {
					OTT string `json:"ott"`
				}
				_ = jsonDecode(r, &body)
				seen = body.OTT
				w.Header().Set("Content-Type", "application/json")
				tt.reply(w, body.OTT)
			}))
			defer srv.Close()
			rootFile := filepath.Join(t.TempDir(), "root.pem")
			if err := os.WriteFile(rootFile, []byte(certPEM(srv.Certificate())), 0o600); err != nil {
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
				t.Fatalf("error = %v, token sent %t; want an error after a request", err, seen != "")
			}
			if strings.Contains(err.Error(), seen) || strings.ContainsAny(err.Error(), "\n\r") {
				t.Fatal("error carries the token or a raw line break")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error = %q, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestSignIntermediateConcurrent(t *testing.T) {
	s := stepcatest.Start(t)
	c := newClient(t, s, stepca.Options{})
	const n = 8
	errs := make(chan error, n)
	for range n {
		go func() {
			_, _, err := c.SignIntermediate(context.Background(), caCSR(t, newKey(t)), time.Hour)
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

func TestSignIntermediateLogsNoSecrets(t *testing.T) {
	s := stepcatest.Start(t)
	var buf bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	c := newClient(t, s, stepca.Options{Logger: logger})
	csr := caCSR(t, newKey(t))
	chain, _, err := c.SignIntermediate(context.Background(), csr, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if !strings.Contains(out, chain[0].SerialNumber.Text(16)) {
		t.Errorf("log %q does not record the intermediate's serial", out)
	}
	for _, tok := range s.Tokens() {
		if strings.Contains(out, tok) || strings.Contains(out, strings.Split(tok, ".")[2]) {
			t.Fatal("log contains the one-time token")
		}
	}
	if strings.Contains(out, base64.StdEncoding.EncodeToString(csr.Raw)[:40]) {
		t.Error("log contains the CSR")
	}
	key, err := os.ReadFile(s.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, strings.TrimSpace(string(key))) {
		t.Error("log contains the provisioner key")
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

// BenchmarkSignIntermediate is one round trip to a real, in-process step-ca:
// token, TLS handshake (no keep-alive), signing and the client's checks.
func BenchmarkSignIntermediate(b *testing.B) {
	s := stepcatest.Start(b)
	c, err := stepca.New(s.Config(), stepca.Options{})
	if err != nil {
		b.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{td.ID().URL()}}, key)
	if err != nil {
		b.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, _, err := c.SignIntermediate(context.Background(), csr, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkNew is mostly decrypting the provisioner key (PBES2, 600,000
// PBKDF2 rounds), which writd pays once at start.
func BenchmarkNew(b *testing.B) {
	s := stepcatest.Start(b)
	for b.Loop() {
		if _, err := stepca.New(s.Config(), stepca.Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
