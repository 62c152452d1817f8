package stepca_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"log/slog"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/upstream/stepca"
	"github.com/writmesh/writ/authority/upstream/stepca/stepcatest"
	"github.com/writmesh/writ/store/pgtest"
)

// TestCAWithStepCAUpstream runs Writ's CA in upstream mode against a real
// step-ca: the CA's intermediate comes from step-ca, the bundle's X.509
// authorities are step-ca's root, and an X.509 SVID the CA issues verifies
// against that bundle.
func TestCAWithStepCAUpstream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := stepcatest.Start(t)
	pool := pgtest.NewMigrated(t)
	up := newClient(t, s, stepca.Options{})
	ca, err := authority.NewCA(ctx, authority.Options{
		TrustDomain: td,
		Pool:        pool,
		ReplicaID:   "replica-a",
		Upstream:    up,
		Log:         slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatalf("NewCA with step-ca upstream: %v", err)
	}
	bundle, err := ca.Bundle(ctx)
	if err != nil {
		t.Fatalf("Bundle: %v", err)
	}
	if got := bundle.X509Authorities(); len(got) != 1 || !got[0].Equal(s.Root) {
		t.Fatalf("bundle has %d X.509 authorities, want step-ca's root only", len(got))
	}

	id := spiffeid.RequireFromPath(td, "/ns/default/sa/web")
	key := newKey(t)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := authority.ParseCSR(der)
	if err != nil {
		t.Fatalf("ParseCSR: %v", err)
	}
	svid, err := ca.SignX509SVID(ctx, authority.X509Request{CSR: csr, ID: id})
	if err != nil {
		t.Fatalf("SignX509SVID: %v", err)
	}
	if len(svid.Chain) != 3 {
		t.Fatalf("chain has %d certificates, want leaf, writd's intermediate, step-ca's intermediate", len(svid.Chain))
	}
	if !svid.Chain[2].Equal(s.Intermediate) {
		t.Errorf("chain[2] is %q, want step-ca's intermediate", svid.Chain[2].Subject)
	}
	if !svid.Chain[1].IsCA || svid.Chain[1].Issuer.String() != s.Intermediate.Subject.String() {
		t.Errorf("chain[1] (issuer %q) is not writd's intermediate signed by step-ca", svid.Chain[1].Issuer)
	}
	gotID, _, err := x509svid.Verify(svid.Chain, bundle)
	if err != nil {
		t.Fatalf("x509svid.Verify against the CA's bundle: %v", err)
	}
	if gotID != id {
		t.Errorf("verified ID %s, want %s", gotID, id)
	}
	if n := len(s.Tokens()); n != 1 {
		t.Errorf("step-ca saw %d sign requests, want 1", n)
	}
}

// TestCAWithStepCAUpstreamPathLenZero: a step-ca fresh from `step ca init`
// (intermediate maxPathLen 0) cannot be writd's upstream; NewCA says why
// instead of issuing SVIDs nobody can verify.
func TestCAWithStepCAUpstreamPathLenZero(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := stepcatest.StartWith(t, stepcatest.Options{PathLenZero: true})
	_, err := authority.NewCA(ctx, authority.Options{
		TrustDomain: td,
		Pool:        pgtest.NewMigrated(t),
		ReplicaID:   "replica-a",
		Upstream:    newClient(t, s, stepca.Options{}),
		Log:         slog.New(slog.DiscardHandler),
	})
	if err == nil || !strings.Contains(err.Error(), "maxPathLen") {
		t.Fatalf("NewCA = %v, want an error naming maxPathLen", err)
	}
}
