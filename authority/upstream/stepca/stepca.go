// Package stepca makes an existing step-ca sign writd's intermediate CA
// certificates (upstream mode), so that an enterprise PKI stays the root of
// trust. Client implements authority.UpstreamSigner.
//
// It speaks step-ca's HTTP API itself: POST /1.0/sign with the CSR and a
// one-time token signed by a JWK provisioner's key. It imports only
// go.step.sm/crypto from smallstep, never github.com/smallstep/certificates,
// whose client drags the whole CA server into writd (its ca package needs
// 694 packages, this one 231); TestDependencies keeps it that way.
//
// The provisioner must issue CA certificates. A template that does, for a
// CSR asking for a CA with the URI SAN spiffe://<trust-domain>:
//
//	{
//		"subject": {{ toJson .Insecure.CR.Subject }},
//		"sans": {{ toJson .SANs }},
//		"keyUsage": ["certSign", "crlSign"],
//		"basicConstraints": {"isCA": true, "maxPathLen": 0}
//	}
//
// With the step CLI that is
//
//	step ca provisioner add writ --type JWK --create --x509-template intermediate.tpl \
//		--x509-max-dur 720h
//
// after which ca.json's "encryptedKey" for the provisioner (a JWE) is the
// provisioner_key_file; a private key from `step crypto jwk create` (JWE in
// JSON form) works too. step-ca's own intermediate must allow a CA below
// it: `step ca init` issues it with maxPathLen 0, which no verifier accepts
// above writd's intermediate, so re-issue it with maxPathLen 1 (or none).
// The provisioner's maxTLSCertDuration must cover ca.intermediate_ttl.
//
// The Client checks what step-ca returns and refuses a certificate that is
// not a CA, is not for the CSR's key, lacks its URI SANs, does not chain to
// the configured roots, or sits under a path-length limit it would break.
// It reads root_file once, in New: restart writd after rotating step-ca's
// root.
//
// Only writd's wiring and tests import this package; it imports config.
package stepca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/jonboulle/clockwork"
	"go.step.sm/crypto/jose"

	"github.com/writmesh/writ/config"
)

const (
	// DefaultTimeout bounds one call to step-ca when Options.Timeout is 0.
	DefaultTimeout = 15 * time.Second

	// tokenLifetime is how long a one-time token is valid; step-ca's own
	// clients use five minutes too.
	tokenLifetime = 5 * time.Minute

	maxResponseBytes = 1 << 20  // a sign response is a few KiB
	maxErrorMessage  = 512      // bytes of step-ca's message kept in errors
	maxFileBytes     = 1 << 20  // root bundle, key and password files
	maxChainCerts    = 8        // certificates in a sign response
	maxHeaderBytes   = 64 << 10 // response headers
)

// Options tunes a Client. The zero value is usable.
type Options struct {
	// Timeout bounds each call to step-ca, from dialing to the last byte of
	// the response; 0 means DefaultTimeout.
	Timeout time.Duration
	// Clock stamps tokens and checks certificate validity; nil means the
	// real clock. step-ca checks tokens against its real clock, so a fake
	// clock is for tests of the token alone.
	Clock clockwork.Clock
	// Logger records signed intermediates (serial, expiry, never the token
	// or the CSR); nil discards.
	Logger *slog.Logger
}

// Client obtains intermediate CA certificates from one step-ca through one
// JWK provisioner. It holds the provisioner's decrypted private key in
// memory and never writes or logs it. It is immutable after New and safe for
// concurrent use.
type Client struct {
	baseURL     string
	signURL     string
	provisioner string
	key         *jose.JSONWebKey // private
	roots       []*x509.Certificate
	rootPool    *x509.CertPool
	fingerprint string // SHA-256 of the first root, hex
	http        *http.Client
	timeout     time.Duration
	clock       clockwork.Clock
	log         *slog.Logger
}

// SignError is step-ca refusing a sign request: its HTTP status and its
// own message, which says why (a template, policy or duration rule).
type SignError struct {
	Status  int
	Message string
}

func (e *SignError) Error() string {
	hint := ""
	if e.Status == http.StatusUnauthorized {
		// step-ca keeps the reason for a rejected token in its own log.
		hint = " (check the provisioner name and key, and that the clocks agree)"
	}
	return fmt.Sprintf("step-ca refused to sign (HTTP %d): %s%s", e.Status, e.Message, hint)
}

// New reads step-ca's roots and opens the provisioner's encrypted key with
// its password. It does not contact step-ca. A wrong password, a key file
// that is not an encrypted JWK, or a root file without a CA certificate is
// an error naming the file.
func New(cfg config.StepCA, opts Options) (*Client, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("step-ca url %q: must be an https:// URL without user, query or fragment", cfg.URL)
	}
	if cfg.Provisioner == "" {
		return nil, errors.New("step-ca provisioner: name is required")
	}
	roots, err := readRoots(cfg.RootFile)
	if err != nil {
		return nil, err
	}
	key, err := readProvisionerKey(cfg.ProvisionerKeyFile, cfg.ProvisionerPasswordFile)
	if err != nil {
		return nil, err
	}
	c := &Client{
		baseURL:     strings.TrimRight(u.String(), "/"),
		provisioner: cfg.Provisioner,
		key:         key,
		roots:       roots,
		rootPool:    x509.NewCertPool(),
		timeout:     opts.Timeout,
		clock:       opts.Clock,
		log:         opts.Logger,
	}
	c.signURL = c.baseURL + "/1.0/sign"
	for _, r := range roots {
		c.rootPool.AddCert(r)
	}
	sum := sha256.Sum256(roots[0].Raw)
	c.fingerprint = hex.EncodeToString(sum[:])
	if c.timeout <= 0 {
		c.timeout = DefaultTimeout
	}
	if c.clock == nil {
		c.clock = clockwork.NewRealClock()
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	c.http = &http.Client{
		Timeout: c.timeout,
		Transport: &http.Transport{
			Proxy: http.ProxyFromEnvironment,
			// step-ca's TLS is verified against its own roots only, never
			// the system pool.
			TLSClientConfig:        &tls.Config{RootCAs: c.rootPool, MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout:    c.timeout,
			ResponseHeaderTimeout:  c.timeout,
			MaxResponseHeaderBytes: maxHeaderBytes,
			ForceAttemptHTTP2:      true,
			// Intermediates are signed about once a day: an idle
			// connection would only be a goroutine to leak.
			DisableKeepAlives: true,
		},
		// A redirect would replay the token to another URL.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c, nil
}

// Roots returns step-ca's root certificates, the trust anchors of every
// chain SignIntermediate returns.
func (c *Client) Roots() []*x509.Certificate { return slices.Clone(c.roots) }

// URL is step-ca's base URL.
func (c *Client) URL() string { return c.baseURL }

// Health checks that step-ca answers GET /1.0/health with status "ok" over
// TLS verified against its roots, within the timeout. writd can use it for
// readiness in upstream mode; it sends no token.
func (c *Client) Health(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.baseURL+"/1.0/health", nil)
	if err != nil {
		return fmt.Errorf("step-ca health: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("step-ca health at %s: %w", c.baseURL, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxErrorMessage))
	if err != nil {
		return fmt.Errorf("step-ca health at %s: read: %w", c.baseURL, err)
	}
	var h struct {
		Status string `json:"status"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(data, &h) != nil || h.Status != "ok" {
		return fmt.Errorf("step-ca health at %s: HTTP %d, status %q", c.baseURL, resp.StatusCode, h.Status)
	}
	return nil
}

// SignIntermediate asks step-ca to sign csr, a CA certificate request, for
// ttl (0 lets the provisioner choose). It returns the new intermediate
// followed by step-ca's intermediates (without the root), and step-ca's
// roots. The result has been checked: it is a CA certificate for the CSR's
// key and URI SANs and it chains to the roots now.
func (c *Client) SignIntermediate(ctx context.Context, csr *x509.CertificateRequest, ttl time.Duration) (chain, roots []*x509.Certificate, err error) {
	if csr == nil {
		return nil, nil, errors.New("sign intermediate with step-ca: no certificate request")
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, nil, fmt.Errorf("sign intermediate with step-ca: certificate request signature: %w", err)
	}
	if ttl < 0 {
		return nil, nil, fmt.Errorf("sign intermediate with step-ca: negative ttl %s", ttl)
	}
	sub, sans, err := subjectAndSANs(csr)
	if err != nil {
		return nil, nil, fmt.Errorf("sign intermediate with step-ca: %w", err)
	}
	ott, err := c.token(sub, sans)
	if err != nil {
		return nil, nil, fmt.Errorf("sign intermediate with step-ca: %w", err)
	}
	certs, err := c.sign(ctx, csr, ott, ttl)
	if err != nil {
		return nil, nil, fmt.Errorf("sign intermediate with step-ca at %s: %w", c.baseURL, err)
	}
	chain, err = c.check(csr, certs)
	if err != nil {
		return nil, nil, fmt.Errorf("sign intermediate with step-ca at %s: %w", c.baseURL, err)
	}
	c.log.Info("step-ca signed intermediate",
		slog.String("upstream", c.baseURL),
		slog.String("serial", chain[0].SerialNumber.Text(16)),
		slog.Time("not_after", chain[0].NotAfter))
	return chain, c.Roots(), nil
}

// signClaims are the claims step-ca's JWK provisioner reads from a sign
// token besides the registered ones.
type signClaims struct {
	jose.Claims
	SANs []string `json:"sans,omitempty"`
	// SHA is the root fingerprint, which step's clients use to bootstrap
	// trust; step-ca ignores it but it binds the token to our root.
	SHA string `json:"sha,omitempty"`
}

// token makes a one-time token authorizing exactly one sign request for
// sub and sans.
func (c *Client) token(sub string, sans []string) (string, error) {
	var jti [32]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", fmt.Errorf("token id: %w", err)
	}
	so := new(jose.SignerOptions).WithType("JWT").WithHeader("kid", c.key.KeyID)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.SignatureAlgorithm(c.key.Algorithm), Key: c.key.Key}, so)
	if err != nil {
		return "", fmt.Errorf("token signer: %w", err)
	}
	now := c.clock.Now()
	claims := signClaims{
		Claims: jose.Claims{
			ID:        hex.EncodeToString(jti[:]),
			Issuer:    c.provisioner,
			Subject:   sub,
			Audience:  jose.Audience{c.signURL},
			NotBefore: jose.NewNumericDate(now),
			IssuedAt:  jose.NewNumericDate(now),
			Expiry:    jose.NewNumericDate(now.Add(tokenLifetime)),
		},
		SANs: sans,
		SHA:  c.fingerprint,
	}
	tok, err := jose.Signed(signer).Claims(claims).CompactSerialize()
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return tok, nil
}

// signRequest and signResponse are step-ca's /1.0/sign bodies.
type signRequest struct {
	CSR      string `json:"csr"`
	OTT      string `json:"ott"`
	NotAfter string `json:"notAfter,omitempty"`
}

type signResponse struct {
	Crt       string   `json:"crt"`
	CA        string   `json:"ca"`
	CertChain []string `json:"certChain"`
}

type errorResponse struct {
	Status  int    `json:"status"`
	Message string `json:"message"`
}

// sign posts the request and returns the certificates step-ca answered,
// leaf first. Its errors never contain the token.
func (c *Client) sign(ctx context.Context, csr *x509.CertificateRequest, ott string, ttl time.Duration) ([]*x509.Certificate, error) {
	req := signRequest{
		CSR: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr.Raw})),
		OTT: ott,
	}
	if ttl > 0 {
		req.NotAfter = ttl.String()
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode request: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, c.signURL, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(hreq)
	if err != nil {
		if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("no answer within %s: %w", c.timeout, ctx.Err())
		}
		var ue *url.Error
		if errors.As(err, &ue) && ue.Timeout() {
			return nil, fmt.Errorf("no answer within %s: %w", c.timeout, context.DeadlineExceeded)
		}
		return nil, fmt.Errorf("post sign request: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes+1))
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("read response: no answer within %s: %w", c.timeout, ctx.Err())
		}
		return nil, fmt.Errorf("read response: %w", err)
	}
	if len(data) > maxResponseBytes {
		return nil, fmt.Errorf("response larger than %d bytes", maxResponseBytes)
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return nil, refusal(resp.StatusCode, data, ott)
	}
	var sr signResponse
	if err := json.Unmarshal(data, &sr); err != nil {
		return nil, fmt.Errorf("decode response: %w", err)
	}
	pems := sr.CertChain
	if len(pems) == 0 {
		pems = []string{sr.Crt}
		if sr.CA != "" {
			pems = append(pems, sr.CA)
		}
	}
	if len(pems) > maxChainCerts {
		return nil, fmt.Errorf("response holds %d certificates, more than %d", len(pems), maxChainCerts)
	}
	certs := make([]*x509.Certificate, 0, len(pems))
	for i, p := range pems {
		got, err := parseCerts([]byte(p))
		if err != nil || len(got) != 1 {
			return nil, fmt.Errorf("response certificate %d: not one PEM certificate", i)
		}
		certs = append(certs, got[0])
	}
	return certs, nil
}

// refusal turns step-ca's error body into a SignError with its message,
// cleaned of control characters and of the token should it be echoed.
func refusal(status int, data []byte, ott string) error {
	var er errorResponse
	msg := ""
	if json.Unmarshal(data, &er) == nil && er.Message != "" {
		msg = er.Message
	} else {
		msg = http.StatusText(status)
	}
	msg = strings.ReplaceAll(msg, ott, "[token]")
	msg = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, msg)
	if len(msg) > maxErrorMessage {
		msg = msg[:maxErrorMessage] + "..."
	}
	return &SignError{Status: status, Message: msg}
}

// check verifies step-ca's answer against the request and the roots, and
// returns the chain without any root step-ca may have appended.
func (c *Client) check(csr *x509.CertificateRequest, certs []*x509.Certificate) ([]*x509.Certificate, error) {
	if len(certs) == 0 {
		return nil, errors.New("response holds no certificate")
	}
	chain := make([]*x509.Certificate, 0, len(certs))
	for _, cert := range certs {
		if !slices.ContainsFunc(c.roots, cert.Equal) {
			chain = append(chain, cert)
		}
	}
	if len(chain) == 0 {
		return nil, errors.New("response holds only a root certificate")
	}
	leaf := chain[0]
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if pub, ok := leaf.PublicKey.(equaler); !ok || !pub.Equal(csr.PublicKey) {
		return nil, errors.New("signed certificate is not for the requested key")
	}
	if !leaf.BasicConstraintsValid || !leaf.IsCA || leaf.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("step-ca issued a certificate that is not a CA (isCA %t, certSign %t): the provisioner %q needs an intermediate template",
			leaf.IsCA, leaf.KeyUsage&x509.KeyUsageCertSign != 0, c.provisioner)
	}
	for _, want := range csr.URIs {
		if !slices.ContainsFunc(leaf.URIs, func(u *url.URL) bool { return u.String() == want.String() }) {
			return nil, fmt.Errorf("signed certificate lacks the requested URI SAN %s: the provisioner %q template must keep the SANs", want, c.provisioner)
		}
	}
	inter := x509.NewCertPool()
	for _, cert := range chain[1:] {
		inter.AddCert(cert)
	}
	verified, err := leaf.Verify(x509.VerifyOptions{
		Roots:         c.rootPool,
		Intermediates: inter,
		CurrentTime:   c.clock.Now(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, fmt.Errorf("signed certificate does not chain to step-ca's roots: %w", err)
	}
	// Our intermediate will sign leaves, so every CA above it must allow
	// one more CA below it than Verify checked for.
	for _, vc := range verified {
		for i := 1; i < len(vc); i++ {
			if limited(vc[i]) && vc[i].MaxPathLen < i {
				return nil, fmt.Errorf("upstream CA %q allows %d CA certificates below it, the chain needs %d: raise its maxPathLen",
					vc[i].Subject.CommonName, vc[i].MaxPathLen, i)
			}
		}
	}
	return chain, nil
}

// limited reports whether a CA certificate sets a path length limit.
func limited(c *x509.Certificate) bool {
	return c.BasicConstraintsValid && (c.MaxPathLen > 0 || c.MaxPathLenZero)
}

// subjectAndSANs picks the token's subject (the CSR's common name, else its
// first SAN) and lists every SAN, which step-ca requires to match the CSR.
func subjectAndSANs(csr *x509.CertificateRequest) (string, []string, error) {
	var sans []string
	for _, u := range csr.URIs {
		sans = append(sans, u.String())
	}
	sans = append(sans, csr.DNSNames...)
	for _, ip := range csr.IPAddresses {
		sans = append(sans, ip.String())
	}
	sans = append(sans, csr.EmailAddresses...)
	sub := csr.Subject.CommonName
	if sub == "" {
		if len(sans) == 0 {
			return "", nil, errors.New("certificate request has neither a common name nor a SAN")
		}
		sub = sans[0]
	}
	return sub, sans, nil
}

// readRoots reads a PEM bundle of CA certificates.
func readRoots(path string) ([]*x509.Certificate, error) {
	data, err := readBounded(path)
	if err != nil {
		return nil, fmt.Errorf("step-ca root file: %w", err)
	}
	roots, err := parseCerts(data)
	if err != nil {
		return nil, fmt.Errorf("step-ca root file %s: %w", path, err)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("step-ca root file %s: no PEM certificate", path)
	}
	for _, r := range roots {
		if !r.BasicConstraintsValid || !r.IsCA {
			return nil, fmt.Errorf("step-ca root file %s: certificate %q is not a CA", path, r.Subject.CommonName)
		}
		// The roots become the trust bundle: an intermediate there would
		// be trusted on its own, past its issuer's revocation or expiry.
		if err := r.CheckSignatureFrom(r); err != nil {
			return nil, fmt.Errorf("step-ca root file %s: certificate %q is not self-signed; give step-ca's root (root_ca.crt), not an intermediate", path, r.Subject.CommonName)
		}
	}
	return roots, nil
}

// readProvisionerKey opens the provisioner's private JWK, which must be
// encrypted (a JWE, as step-ca's ca.json and `step crypto jwk create`
// write it).
func readProvisionerKey(keyFile, passwordFile string) (*jose.JSONWebKey, error) {
	data, err := readBounded(keyFile)
	if err != nil {
		return nil, fmt.Errorf("step-ca provisioner key: %w", err)
	}
	pass, err := readBounded(passwordFile)
	if err != nil {
		return nil, fmt.Errorf("step-ca provisioner password: %w", err)
	}
	defer clear(pass)
	pass = bytes.TrimRight(pass, "\r\n")
	if len(pass) == 0 {
		return nil, fmt.Errorf("step-ca provisioner password file %s is empty", passwordFile)
	}
	enc, err := jose.ParseEncrypted(string(bytes.TrimSpace(data)))
	if err != nil {
		return nil, fmt.Errorf("step-ca provisioner key file %s: not an encrypted JWK (JWE): %w", keyFile, err)
	}
	plain, err := enc.Decrypt(pass)
	if err != nil {
		return nil, fmt.Errorf("step-ca provisioner key file %s: cannot decrypt: wrong password in %s or damaged key", keyFile, passwordFile)
	}
	defer clear(plain)
	key := new(jose.JSONWebKey)
	if err := json.Unmarshal(plain, key); err != nil {
		return nil, fmt.Errorf("step-ca provisioner key file %s: decrypted content is not a JWK: %w", keyFile, err)
	}
	if key.IsPublic() || !jose.IsAsymmetric(key) {
		return nil, fmt.Errorf("step-ca provisioner key file %s: not an asymmetric private key", keyFile)
	}
	if key.KeyID == "" {
		if key.KeyID, err = jose.Thumbprint(key); err != nil {
			return nil, fmt.Errorf("step-ca provisioner key file %s: key id: %w", keyFile, err)
		}
	}
	if key.Algorithm == "" {
		key.Algorithm = defaultAlgorithm(key.Key)
	}
	if key.Algorithm == "" {
		return nil, fmt.Errorf("step-ca provisioner key file %s: no signature algorithm for a %T", keyFile, key.Key)
	}
	return key, nil
}

// defaultAlgorithm is the JWS algorithm step uses for a key without "alg".
func defaultAlgorithm(key any) string {
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		switch k.Curve {
		case elliptic.P256():
			return jose.ES256
		case elliptic.P384():
			return jose.ES384
		case elliptic.P521():
			return jose.ES512
		}
	case ed25519.PrivateKey:
		return jose.EdDSA
	case *rsa.PrivateKey:
		return jose.RS256
	}
	return ""
}

func readBounded(path string) ([]byte, error) {
	if path == "" {
		return nil, errors.New("no file configured")
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > maxFileBytes {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxFileBytes)
	}
	return data, nil
}

func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, cert)
	}
	return certs, nil
}
