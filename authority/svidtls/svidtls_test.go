package svidtls_test

import (
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/svidtls"
)

func TestVerify(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	node := env.Attest(t, "n1")
	raw := [][]byte{}
	for _, c := range node.Certificates {
		raw = append(raw, c.Raw)
	}
	bundle := env.Bundle(t)
	if err := svidtls.Verify(bundle, svidtls.AuthorizeID(node.ID), env.Clock)(raw, nil); err != nil {
		t.Fatalf("valid svid refused: %v", err)
	}
	if err := svidtls.Verify(bundle, svidtls.AuthorizeMemberOf(authoritytest.TrustDomain), env.Clock)(raw, nil); err != nil {
		t.Fatalf("member of the trust domain refused: %v", err)
	}
	other := spiffeid.RequireFromString("spiffe://example.org/node/n2")
	if err := svidtls.Verify(bundle, svidtls.AuthorizeID(other), env.Clock)(raw, nil); err == nil || !strings.Contains(err.Error(), "not authorized") {
		t.Fatalf("wrong id: %v", err)
	}
	if err := svidtls.Verify(bundle, nil, env.Clock)(nil, nil); err == nil {
		t.Fatal("no certificate accepted")
	}
	if err := svidtls.Verify(bundle, nil, env.Clock)([][]byte{[]byte("junk")}, nil); err == nil {
		t.Fatal("junk accepted")
	}
	// Another CA's SVID.
	stranger := authoritytest.Start(t, authoritytest.Options{}).Attest(t, "n1")
	if err := svidtls.Verify(bundle, nil, env.Clock)([][]byte{stranger.Certificates[0].Raw}, nil); err == nil {
		t.Fatal("another CA's svid accepted")
	}
	// Validity is judged on the injected clock.
	env.Clock.Advance(2 * time.Hour)
	if err := svidtls.Verify(bundle, nil, env.Clock)(raw, nil); err == nil {
		t.Fatal("expired svid accepted")
	}
}
