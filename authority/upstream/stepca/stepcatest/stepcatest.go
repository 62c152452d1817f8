// Package stepcatest runs a real step-ca inside a test process: step-ca's
// own authority (github.com/smallstep/certificates) behind its own HTTP API,
// served over TLS on 127.0.0.1. It exists so that tests of writd's upstream
// mode (package stepca, the CA, end-to-end suites) sign against the real
// thing. Only tests import it: it links the whole step-ca server.
//
// step-ca logs one-time tokens through its request-logging middleware; the
// harness installs no such middleware and no error logger, so nothing the
// CA receives is printed.
package stepcatest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/smallstep/certificates/api"
	"github.com/smallstep/certificates/authority"
	stepconfig "github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/provisioner"
	"go.step.sm/crypto/jose"

	"github.com/writmesh/writ/config"
)

// IntermediateTemplate is the X.509 template of the harness's main
// provisioner: it turns a CSR into an intermediate CA certificate that may
// sign leaves only, keeping the CSR's subject and SANs.
const IntermediateTemplate = `{
	"subject": {{ toJson .Insecure.CR.Subject }},
	"sans": {{ toJson .SANs }},
	"keyUsage": ["certSign", "crlSign"],
	"basicConstraints": {"isCA": true, "maxPathLen": 0}
}`

// Durations the main provisioner allows.
const (
	DefaultCertDuration = 24 * time.Hour
	MaxCertDuration     = 30 * 24 * time.Hour
)

// StepCA is a running step-ca and the files a client needs to use it.
type StepCA struct {
	// URL is the https:// base URL (no trailing slash).
	URL string
	// Root is step-ca's root; RootFile holds it as PEM.
	Root     *x509.Certificate
	RootFile string
	// Intermediate is step-ca's issuing CA (maxPathLen 1), signed by Root.
	Intermediate *x509.Certificate
	// Provisioner is a JWK provisioner issuing intermediate CAs with
	// IntermediateTemplate. LeafProvisioner shares its key but keeps
	// step-ca's default leaf template, a misconfiguration clients should
	// refuse.
	Provisioner     string
	LeafProvisioner string
	// KeyFile holds the provisioner's private JWK encrypted (JWE compact,
	// as in ca.json's encryptedKey) with the password in PasswordFile.
	KeyFile      string
	PasswordFile string
	// Authority is the embedded step-ca, for tests that look inside.
	Authority *authority.Authority

	mu     sync.Mutex
	tokens []string
}

// Tokens returns the one-time tokens step-ca has received so far, so that
// tests can check no error or log repeats one. Never print them.
func (s *StepCA) Tokens() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.tokens)
}

// recordTokens keeps the "ott" of every request body for Tokens.
func (s *StepCA) recordTokens(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil {
			body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
			if err != nil {
				http.Error(w, "read body", http.StatusBadRequest)
				return
			}
			var req struct {
				OTT string `json:"ott"`
			}
			if json.Unmarshal(body, &req) == nil && req.OTT != "" {
				s.mu.Lock()
				s.tokens = append(s.tokens, req.OTT)
				s.mu.Unlock()
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		next.ServeHTTP(w, r)
	})
}

// Config is the writd configuration block addressing this step-ca.
func (s *StepCA) Config() config.StepCA {
	return config.StepCA{
		URL:                     s.URL,
		RootFile:                s.RootFile,
		Provisioner:             s.Provisioner,
		ProvisionerKeyFile:      s.KeyFile,
		ProvisionerPasswordFile: s.PasswordFile,
	}
}

// Options vary the step-ca Start runs.
type Options struct {
	// PathLenZero gives step-ca's intermediate maxPathLen 0, as `step ca
	// init` does by default: the intermediates it signs are then CAs no
	// verifier accepts below it.
	PathLenZero bool
}

// Start runs a step-ca with a fresh root, intermediate and JWK provisioners
// until the test ends. Its files live in a temp dir of t.
func Start(t testing.TB) *StepCA {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is Start with options.
func StartWith(t testing.TB, opts Options) *StepCA {
	t.Helper()
	interPathLen := 1 // room for writd's intermediate
	if opts.PathLenZero {
		interPathLen = 0
	}
	dir := t.TempDir()
	now := time.Now()

	rootKey := newKey(t)
	root := newCert(t, &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"Writ test"}, CommonName: "Writ test step-ca root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            -1,
	}, nil, rootKey.Public(), rootKey)
	interKey := newKey(t)
	inter := newCert(t, &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"Writ test"}, CommonName: "Writ test step-ca intermediate"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(5 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            interPathLen,
		MaxPathLenZero:        interPathLen == 0,
	}, root, interKey.Public(), rootKey)

	s := &StepCA{
		Root:            root,
		RootFile:        filepath.Join(dir, "root_ca.crt"),
		Intermediate:    inter,
		Provisioner:     "writ",
		LeafProvisioner: "writ-leaf",
		KeyFile:         filepath.Join(dir, "provisioner.key.jwe"),
		PasswordFile:    filepath.Join(dir, "provisioner.password"),
	}
	writeFile(t, s.RootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}))

	password := make([]byte, 24)
	if _, err := rand.Read(password); err != nil {
		t.Fatalf("stepcatest: password: %v", err)
	}
	for i := range password {
		password[i] = 'a' + password[i]%26
	}
	writeFile(t, s.PasswordFile, append(password, '\n'))
	pub, jwe, err := jose.GenerateDefaultKeyPair(password)
	if err != nil {
		t.Fatalf("stepcatest: provisioner key: %v", err)
	}
	encrypted, err := jwe.CompactSerialize()
	if err != nil {
		t.Fatalf("stepcatest: serialize provisioner key: %v", err)
	}
	writeFile(t, s.KeyFile, []byte(encrypted))

	dur := func(d time.Duration) *provisioner.Duration { return &provisioner.Duration{Duration: d} }
	claims := &provisioner.Claims{
		MinTLSDur:     dur(time.Minute),
		MaxTLSDur:     dur(MaxCertDuration),
		DefaultTLSDur: dur(DefaultCertDuration),
	}
	provs := provisioner.List{
		&provisioner.JWK{
			Type: "JWK", Name: s.Provisioner, Key: pub, EncryptedKey: encrypted, Claims: claims,
			Options: &provisioner.Options{X509: &provisioner.X509Options{Template: IntermediateTemplate}},
		},
		&provisioner.JWK{Type: "JWK", Name: s.LeafProvisioner, Key: pub, EncryptedKey: encrypted, Claims: claims},
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("stepcatest: listen: %v", err)
	}
	cfg := &stepconfig.Config{
		Address:  ln.Addr().String(),
		DNSNames: []string{"127.0.0.1", "localhost"},
		AuthorityConfig: &stepconfig.AuthConfig{
			Provisioners: provs,
		},
	}
	auth, err := authority.NewEmbedded(
		authority.WithConfig(cfg),
		authority.WithX509RootCerts(root),
		authority.WithX509Signer(inter, interKey),
		authority.WithQuietInit(),
	)
	if err != nil {
		ln.Close()
		t.Fatalf("stepcatest: start step-ca authority: %v", err)
	}
	s.Authority = auth
	tlsCert, err := auth.GetTLSCertificate()
	if err != nil {
		ln.Close()
		t.Fatalf("stepcatest: step-ca TLS certificate: %v", err)
	}

	mux := chi.NewRouter()
	mux.Use(s.recordTokens)
	api.Route(mux)
	mux.Route("/1.0", func(r chi.Router) { api.Route(r) })
	srv := &httptest.Server{
		Listener: ln,
		Config: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: 10 * time.Second,
			ErrorLog:          log.New(io.Discard, "", 0),
			BaseContext: func(net.Listener) context.Context {
				return authority.NewContext(context.Background(), auth)
			},
		},
		TLS: &tls.Config{Certificates: []tls.Certificate{*tlsCert}, MinVersion: tls.VersionTLS12},
	}
	srv.StartTLS()
	s.URL = srv.URL
	t.Cleanup(func() {
		srv.Close()
		_ = auth.Shutdown()
	})
	return s
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("stepcatest: key: %v", err)
	}
	return k
}

func newCert(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	t.Helper()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		t.Fatalf("stepcatest: serial: %v", err)
	}
	tmpl.SerialNumber = serial
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatalf("stepcatest: create certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("stepcatest: parse certificate: %v", err)
	}
	return cert
}

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatalf("stepcatest: %v", err)
	}
}
