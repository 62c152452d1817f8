package authority

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/store/pgtest"
)

var testTD = spiffeid.RequireTrustDomainFromString("example.org")

func testKEK(t testing.TB) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func newCA(t testing.TB, pool *pgxpool.Pool, clk clockwork.Clock, replica string, kek []byte, mod func(*Options)) *CA {
	t.Helper()
	o := Options{TrustDomain: testTD, Pool: pool, ReplicaID: replica, KEK: kek, Clock: clk}
	if mod != nil {
		mod(&o)
	}
	ca, err := NewCA(ctxT(t), o)
	if err != nil {
		t.Fatalf("NewCA(%s): %v", replica, err)
	}
	return ca
}

func workloadID(name string) spiffeid.ID {
	return spiffeid.RequireFromPath(testTD, "/ns/default/sa/"+name)
}

// newCSR makes a P-256 key and a CSR for it, with the given URI SANs.
func newCSR(t testing.TB, uris ...string) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return key, der
}

func sign(t testing.TB, ca *CA, id spiffeid.ID, ttl time.Duration) *IssuedX509 {
	t.Helper()
	_, der := newCSR(t, id.String())
	csr, err := ParseCSR(der)
	if err != nil {
		t.Fatalf("ParseCSR: %v", err)
	}
	got, err := ca.SignX509SVID(ctxT(t), X509Request{CSR: csr, ID: id, TTL: ttl})
	if err != nil {
		t.Fatalf("SignX509SVID: %v", err)
	}
	return got
}

func bundleOf(t testing.TB, ca *CA) *spiffebundle.Bundle {
	t.Helper()
	b, err := ca.Bundle(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustVerify(t testing.TB, what string, svid *IssuedX509, b *spiffebundle.Bundle, now time.Time) {
	t.Helper()
	id, _, err := x509svid.Verify(svid.Chain, b, x509svid.WithTime(now))
	if err != nil {
		t.Fatalf("%s: svid %s does not verify against bundle (seq %s) at %s: %v", what, svid.Serial, seqOf(b), now.UTC(), err)
	}
	if want := svid.Chain[0].URIs[0].String(); id.String() != want {
		t.Fatalf("%s: verified id %s, want %s", what, id, want)
	}
}

func seqOf(b *spiffebundle.Bundle) string {
	s, _ := b.SequenceNumber()
	return big.NewInt(int64(s)).String()
}

func countRows(t testing.TB, pool *pgxpool.Pool, q string, args ...any) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(ctxT(t), q, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return n
}

func TestFirstStartGeneratesRootAndRestartReusesIt(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	kek := testKEK(t)
	a := newCA(t, pool, clk, "a", kek, nil)
	if got := countRows(t, pool, "SELECT count(*) FROM ca_roots WHERE state = 'active'"); got != 1 {
		t.Fatalf("active roots = %d, want 1", got)
	}
	roots := a.Roots()
	if len(roots) != 1 {
		t.Fatalf("bundle has %d roots, want 1", len(roots))
	}
	r := roots[0]
	if !r.IsCA || r.PublicKeyAlgorithm != x509.ECDSA || r.PublicKey.(*ecdsa.PublicKey).Curve != elliptic.P256() {
		t.Fatalf("root is not an ECDSA P-256 CA: %+v", r.Subject)
	}
	var sealed []byte
	if err := pool.QueryRow(ctxT(t), "SELECT key_sealed FROM ca_roots").Scan(&sealed); err != nil {
		t.Fatal(err)
	}
	if _, err := x509.ParsePKCS8PrivateKey(sealed); err == nil {
		t.Fatal("root key is stored in the clear")
	}

	// A restart (or a second replica) on the same database reuses the root.
	b := newCA(t, pool, clk, "b", kek, nil)
	if got := b.Roots(); len(got) != 1 || !got[0].Equal(r) {
		t.Fatalf("second CA has roots %v, want the first CA's root", got)
	}
	if got := countRows(t, pool, "SELECT count(*) FROM ca_roots"); got != 1 {
		t.Fatalf("roots = %d, want 1", got)
	}
	// Both replicas sign, and both chains verify against either bundle.
	sa, sb := sign(t, a, workloadID("a"), 0), sign(t, b, workloadID("b"), 0)
	if sa.Signer == sb.Signer {
		t.Fatal("two replicas share an intermediate")
	}
	for _, bundle := range []*spiffebundle.Bundle{bundleOf(t, a), bundleOf(t, b)} {
		mustVerify(t, "replica a", sa, bundle, clk.Now())
		mustVerify(t, "replica b", sb, bundle, clk.Now())
	}
	if got := countRows(t, pool, "SELECT count(*) FROM issuance_log WHERE kind = 'intermediate' AND outcome = 'issued'"); got != 2 {
		t.Fatalf("intermediate issuance rows = %d, want 2", got)
	}
	if got := a.ControlPlaneID().String(); got != "spiffe://example.org/writ/control-plane" {
		t.Fatalf("ControlPlaneID = %s", got)
	}
}

func TestReplicasStartingTogetherShareOneRoot(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	kek := testKEK(t)
	const n = 4
	cas := make([]*CA, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cas[i], errs[i] = NewCA(ctxT(t), Options{TrustDomain: testTD, Pool: pool, ReplicaID: string(rune('a' + i)), KEK: kek, Clock: clk})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	if got := countRows(t, pool, "SELECT count(*) FROM ca_roots"); got != 1 {
		t.Fatalf("roots = %d, want 1", got)
	}
	// Exactly one replica's first JWT key signs at once; the others wait.
	if got := countRows(t, pool, "SELECT count(*) FROM jwt_keys WHERE active_at = created_at"); got != 1 {
		t.Fatalf("immediately active jwt keys = %d, want 1", got)
	}
	for _, ca := range cas {
		if err := ca.refreshBundle(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	for i, ca := range cas {
		mustVerify(t, "replica", sign(t, ca, workloadID("w"), 0), bundleOf(t, cas[(i+1)%n]), clk.Now())
	}
}

func TestWrongKEKFailsClearly(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	newCA(t, pool, clk, "a", testKEK(t), nil)
	_, err := NewCA(ctxT(t), Options{TrustDomain: testTD, Pool: pool, ReplicaID: "b", KEK: testKEK(t), Clock: clk})
	if err == nil || !strings.Contains(err.Error(), "key-encryption key (KEK)") {
		t.Fatalf("NewCA with another KEK: err = %v, want one naming the KEK", err)
	}
	_, err = NewCA(ctxT(t), Options{TrustDomain: testTD, Pool: pool, ReplicaID: "c", Clock: clk})
	if err == nil || !strings.Contains(err.Error(), "KEK") {
		t.Fatalf("NewCA without a KEK: err = %v", err)
	}
}

// testRootPEM makes a self-signed P-256 root as an operator's PKI would.
func testRootPEM(t testing.TB, now time.Time) (certPEM, keyPEM []byte, cert *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(42),
		Subject:               pkix.Name{CommonName: "operator root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(5 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), cert
}

func TestImportRoot(t *testing.T) {
	clk := newClock()
	certPEM, keyPEM, cert := testRootPEM(t, clk.Now())
	t.Run("imported root signs", func(t *testing.T) {
		pool := newPool(t)
		ca := newCA(t, pool, clk, "a", testKEK(t), func(o *Options) { o.RootCertPEM, o.RootKeyPEM = certPEM, keyPEM })
		if got := ca.Roots(); len(got) != 1 || !got[0].Equal(cert) {
			t.Fatalf("bundle roots %v, want the imported root", got)
		}
		svid := sign(t, ca, workloadID("w"), 0)
		mustVerify(t, "imported", svid, spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{cert}), clk.Now())
	})
	t.Run("key that does not match is refused", func(t *testing.T) {
		pool := newPool(t)
		_, otherKey, _ := testRootPEM(t, clk.Now())
		_, err := NewCA(ctxT(t), Options{TrustDomain: testTD, Pool: pool, ReplicaID: "a", KEK: testKEK(t), Clock: clk, RootCertPEM: certPEM, RootKeyPEM: otherKey})
		if err == nil || !strings.Contains(err.Error(), "does not match") {
			t.Fatalf("err = %v, want a key mismatch", err)
		}
		if got := countRows(t, pool, "SELECT count(*) FROM ca_roots"); got != 0 {
			t.Fatalf("roots stored after refusal: %d", got)
		}
	})
	t.Run("non-CA certificate is refused", func(t *testing.T) {
		_, err := parseRootPEM([]byte("junk"), keyPEM, clk.Now())
		if err == nil {
			t.Fatal("junk root accepted")
		}
	})
}

func TestX509SVID(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	ca := newCA(t, pool, clk, "a", testKEK(t), func(o *Options) {
		o.Config.IntermediateTTL = config.Duration(6 * time.Hour)
		o.Config.X509SVIDMaxTTL = config.Duration(4 * time.Hour)
	})
	id := workloadID("web")
	leaf := func(s *IssuedX509) *x509.Certificate { return s.Chain[0] }

	s := sign(t, ca, id, 0)
	if got := leaf(s).NotAfter.Sub(clk.Now()); got != time.Hour {
		t.Errorf("default ttl = %s, want 1h", got)
	}
	l := leaf(s)
	if len(l.URIs) != 1 || l.URIs[0].String() != id.String() || len(l.DNSNames)+len(l.IPAddresses)+len(l.EmailAddresses) != 0 {
		t.Errorf("SANs: uris %v dns %v ip %v email %v, want only %s", l.URIs, l.DNSNames, l.IPAddresses, l.EmailAddresses, id)
	}
	if l.IsCA || len(l.ExtKeyUsage) != 2 || l.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || l.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("leaf IsCA %v EKU %v", l.IsCA, l.ExtKeyUsage)
	}
	if l.SerialNumber.BitLen() < 64 || s.Serial != l.SerialNumber.Text(16) {
		t.Errorf("serial %s (%d bits)", s.Serial, l.SerialNumber.BitLen())
	}
	if s.Signer != s.Chain[1].SerialNumber.Text(16) || len(s.Chain) != 2 {
		t.Errorf("chain length %d, signer %s", len(s.Chain), s.Signer)
	}
	if got := leaf(sign(t, ca, id, 100*time.Hour)).NotAfter.Sub(clk.Now()); got != 4*time.Hour {
		t.Errorf("ttl 100h capped to %s, want 4h", got)
	}
	if got := leaf(sign(t, ca, id, time.Second)).NotAfter.Sub(clk.Now()); got != config.MinSVIDTTL {
		t.Errorf("ttl 1s raised to %s, want %s", got, config.MinSVIDTTL)
	}
	// Near the intermediate's end, an SVID never outlives it.
	clk.Advance(3 * time.Hour) // no tick: the intermediate is not rotated
	got := sign(t, ca, id, 4*time.Hour)
	if !leaf(got).NotAfter.Equal(got.Chain[1].NotAfter) {
		t.Errorf("svid ends %s, after its intermediate %s", leaf(got).NotAfter, got.Chain[1].NotAfter)
	}
	mustVerify(t, "capped", got, bundleOf(t, ca), clk.Now())

	// Refusals.
	_, der := newCSR(t)
	csr, _ := ParseCSR(der)
	for name, req := range map[string]X509Request{
		"other trust domain": {CSR: csr, ID: spiffeid.RequireFromString("spiffe://evil.org/x")},
		"no csr":             {ID: id},
		"negative ttl":       {CSR: csr, ID: id, TTL: -time.Second},
	} {
		if _, err := ca.SignX509SVID(ctxT(t), req); err == nil {
			t.Errorf("%s: signed", name)
		}
	}
	_, der = newCSR(t, workloadID("other").String())
	csr, _ = ParseCSR(der)
	if _, err := ca.SignX509SVID(ctxT(t), X509Request{CSR: csr, ID: id}); err == nil {
		t.Error("csr for another id: signed")
	}
}

func TestIntermediateRotationAtHalfLife(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	ca := newCA(t, pool, clk, "a", testKEK(t), func(o *Options) { o.Config.IntermediateTTL = config.Duration(4 * time.Hour) })
	first := sign(t, ca, workloadID("w"), 0)
	clk.Advance(time.Hour)
	if err := ca.tick(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if got := sign(t, ca, workloadID("w"), 0); got.Signer != first.Signer {
		t.Fatal("intermediate rotated before half life")
	}
	clk.Advance(time.Hour + backdate)
	before := sign(t, ca, workloadID("w"), 0)
	if err := ca.tick(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	after := sign(t, ca, workloadID("w"), 0)
	if after.Signer == first.Signer {
		t.Fatal("intermediate not rotated at half life")
	}
	b := bundleOf(t, ca)
	mustVerify(t, "issued before rotation", before, b, clk.Now())
	mustVerify(t, "issued after rotation", after, b, clk.Now())
	var retired *time.Time
	var last *time.Time
	if err := pool.QueryRow(ctxT(t), "SELECT retired_at, last_leaf_not_after FROM ca_intermediates WHERE serial = $1", first.Signer).Scan(&retired, &last); err != nil {
		t.Fatal(err)
	}
	if retired == nil || last == nil || !last.Equal(before.NotAfter) {
		t.Fatalf("old intermediate retired_at %v last_leaf_not_after %v, want set and %s", retired, last, before.NotAfter)
	}
}

func TestBundleFormatAndSequence(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	ca := newCA(t, pool, clk, "a", testKEK(t), func(o *Options) { o.Config.BundleRefreshHint = config.Duration(time.Minute) })
	b := bundleOf(t, ca)
	raw, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"use":"x509-svid"`, `"use":"jwt-svid"`, `"spiffe_sequence":1`, `"spiffe_refresh_hint":60`} {
		if !strings.Contains(string(raw), want) {
			t.Errorf("bundle JSON lacks %s: %s", want, raw)
		}
	}
	parsed, err := spiffebundle.Parse(testTD, raw)
	if err != nil {
		t.Fatalf("spiffebundle.Parse: %v", err)
	}
	if !parsed.Equal(b) {
		t.Fatal("parsed bundle differs")
	}
	seq := func() uint64 {
		s, ok := bundleOf(t, ca).SequenceNumber()
		if !ok {
			t.Fatal("bundle has no sequence")
		}
		return s
	}
	if got := seq(); got != 1 {
		t.Fatalf("first sequence = %d, want 1", got)
	}
	for range 3 {
		clk.Advance(time.Minute)
		if err := ca.tick(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	if got := seq(); got != 1 {
		t.Fatalf("sequence moved to %d with no change", got)
	}
	if _, err := ca.RotateRoot(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if got := seq(); got != 2 {
		t.Fatalf("sequence after a new root = %d, want 2", got)
	}
	// Another replica sees the same sequence for the same content.
	other := newCA(t, pool, clk, "b", ca.kek, nil)
	// Its new JWT key changed the bundle once.
	if s, _ := bundleOf(t, other).SequenceNumber(); s != 3 {
		t.Fatalf("second replica's sequence = %d, want 3", s)
	}
	if err := ca.tick(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if got := seq(); got != 3 {
		t.Fatalf("first replica's sequence after refresh = %d, want 3", got)
	}
}

// fakeUpstream is an in-memory upstream PKI: a root and an upstream
// intermediate that signs writd's intermediates.
type fakeUpstream struct {
	root, inter *x509.Certificate
	interKey    *ecdsa.PrivateKey
	calls       int
}

func newFakeUpstream(t testing.TB, now time.Time) *fakeUpstream {
	t.Helper()
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	interKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rt := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "upstream root"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(1000 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	rder, err := x509.CreateCertificate(rand.Reader, rt, rt, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rder)
	it := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "upstream intermediate"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(500 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true, MaxPathLen: 1}
	ider, err := x509.CreateCertificate(rand.Reader, it, root, interKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	inter, _ := x509.ParseCertificate(ider)
	return &fakeUpstream{root: root, inter: inter, interKey: interKey}
}

func (u *fakeUpstream) SignIntermediate(ctx context.Context, csr *x509.CertificateRequest, ttl time.Duration) ([]*x509.Certificate, []*x509.Certificate, error) {
	u.calls++
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(100 + u.calls)), Subject: csr.Subject, URIs: csr.URIs,
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(ttl), KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, u.inter, csr.PublicKey, u.interKey)
	if err != nil {
		return nil, nil, err
	}
	c, _ := x509.ParseCertificate(der)
	return []*x509.Certificate{c, u.inter}, []*x509.Certificate{u.root}, nil
}

func TestUpstreamMode(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	up := newFakeUpstream(t, clk.Now())
	ca := newCA(t, pool, clk, "a", nil, func(o *Options) {
		o.Upstream = up
		o.Config.IntermediateTTL = config.Duration(2 * time.Hour)
	})
	if got := ca.Roots(); len(got) != 1 || !got[0].Equal(up.root) {
		t.Fatalf("bundle roots %v, want the upstream root", got)
	}
	if got := countRows(t, pool, "SELECT count(*) FROM ca_roots WHERE upstream AND key_sealed IS NULL"); got != 1 {
		t.Fatalf("upstream roots stored = %d, want 1 without key", got)
	}
	svid := sign(t, ca, workloadID("w"), 0)
	if len(svid.Chain) != 3 || !svid.Chain[2].Equal(up.inter) {
		t.Fatalf("chain length %d, want leaf, ours, upstream intermediate", len(svid.Chain))
	}
	mustVerify(t, "upstream", svid, spiffebundle.FromX509Authorities(testTD, []*x509.Certificate{up.root}), clk.Now())
	if _, err := ca.RotateRoot(ctxT(t)); err == nil {
		t.Fatal("RotateRoot in upstream mode succeeded")
	}
	// A second replica and an intermediate rotation both go to upstream.
	b := newCA(t, pool, clk, "b", nil, func(o *Options) { o.Upstream = up })
	mustVerify(t, "upstream replica b", sign(t, b, workloadID("w"), 0), bundleOf(t, ca), clk.Now())
	clk.Advance(time.Hour)
	if err := ca.tick(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if up.calls != 3 {
		t.Fatalf("upstream signed %d intermediates, want 3", up.calls)
	}
	// An upstream that hands back a certificate for another key is refused.
	bad := &badUpstream{fakeUpstream: up}
	if _, err := NewCA(ctxT(t), Options{TrustDomain: testTD, Pool: pool, ReplicaID: "c", Clock: clk, Upstream: bad}); err == nil || !strings.Contains(err.Error(), "another key") {
		t.Fatalf("err = %v, want refusal of a certificate for another key", err)
	}
}

type badUpstream struct{ *fakeUpstream }

func (u *badUpstream) SignIntermediate(ctx context.Context, csr *x509.CertificateRequest, ttl time.Duration) ([]*x509.Certificate, []*x509.Certificate, error) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr.PublicKey = k.Public()
	return u.fakeUpstream.SignIntermediate(ctx, csr, ttl)
}

func TestRunStopsSigningAndRetiresIntermediate(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	ca := newCA(t, pool, clk, "a", testKEK(t), func(o *Options) {
		o.Config.IntermediateTTL = config.Duration(2 * time.Hour)
		o.Config.BundleRefreshHint = config.Duration(time.Minute)
	})
	first := sign(t, ca, workloadID("w"), 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ca.Run(ctx) }()
	if err := clk.BlockUntilContext(ctxT(t), 1); err != nil { // Run's ticker
		t.Fatal(err)
	}
	clk.Advance(time.Hour + backdate)
	// Run rotates the intermediate on its next tick; wait for it.
	deadline := time.Now().Add(30 * time.Second)
	for countRows(t, pool, "SELECT count(*) FROM ca_intermediates") < 2 {
		if time.Now().After(deadline) {
			t.Fatal("Run did not rotate the intermediate at half life")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	_, der := newCSR(t)
	csr, err := ParseCSR(der)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.SignX509SVID(ctxT(t), X509Request{CSR: csr, ID: workloadID("w")}); err == nil {
		t.Fatal("signed after Run returned")
	}
	if got := countRows(t, pool, "SELECT count(*) FROM ca_intermediates WHERE retired_at IS NULL"); got != 0 {
		t.Fatalf("%d intermediates not retired after Run returned", got)
	}
	_ = first
}

// newClock is a fake clock at a whole second, as certificate times are.
func newClock() *clockwork.FakeClock {
	return clockwork.NewFakeClockAt(time.Now().Truncate(time.Second))
}

func newPool(t testing.TB) *pgxpool.Pool { return pgtest.NewMigrated(t) }

func TestImportIgnoredOnceARootExists(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	kek := testKEK(t)
	a := newCA(t, pool, clk, "a", kek, nil)
	certPEM, keyPEM, cert := testRootPEM(t, clk.Now())
	b := newCA(t, pool, clk, "b", kek, func(o *Options) { o.RootCertPEM, o.RootKeyPEM = certPEM, keyPEM })
	if got := b.Roots(); len(got) != 1 || got[0].Equal(cert) || !got[0].Equal(a.Roots()[0]) {
		t.Fatal("a later start replaced the database's root with the configured import")
	}
}

func TestNewCARefusesBadOptions(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	base := func() Options {
		return Options{TrustDomain: testTD, Pool: pool, ReplicaID: "a", KEK: testKEK(t), Clock: clk}
	}
	for name, mod := range map[string]func(*Options){
		"no trust domain":         func(o *Options) { o.TrustDomain = spiffeid.TrustDomain{} },
		"no pool":                 func(o *Options) { o.Pool = nil },
		"no replica id":           func(o *Options) { o.ReplicaID = "" },
		"short kek":               func(o *Options) { o.KEK = o.KEK[:16] },
		"ttl above max":           func(o *Options) { o.Config.X509SVIDTTL = config.Duration(13 * time.Hour) },
		"jwt keys cannot overlap": func(o *Options) { o.Config.JWTKeyTTL = config.Duration(time.Hour) },
		"import and upstream": func(o *Options) {
			o.Upstream = newFakeUpstream(t, clk.Now())
			o.RootCertPEM = []byte("x")
		},
	} {
		o := base()
		mod(&o)
		if _, err := NewCA(ctxT(t), o); err == nil {
			t.Errorf("%s: NewCA succeeded", name)
		}
	}
}
