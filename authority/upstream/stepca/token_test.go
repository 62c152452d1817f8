package stepca

import (
	"crypto/sha256"
	"encoding/hex"
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"go.step.sm/crypto/jose"

	"github.com/writmesh/writ/authority/upstream/stepca/stepcatest"
)

// TestTokenClaims checks the one-time token against what step-ca's JWK
// provisioner reads: kid header, iss = provisioner, aud = the sign URL,
// sub, sans, a fresh jti, a five-minute validity from the injected clock,
// and sha = the root fingerprint.
func TestTokenClaims(t *testing.T) {
	s := stepcatest.Start(t)
	clock := clockwork.NewFakeClockAt(time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC))
	c, err := New(s.Config(), Options{Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := c.token("spiffe://example.org", []string{"spiffe://example.org"})
	if err != nil {
		t.Fatal(err)
	}
	jwt, err := jose.ParseSigned(tok)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := jwt.Headers[0].KeyID, c.key.KeyID; got != want || got == "" {
		t.Errorf("kid = %q, want %q", got, want)
	}
	pub := c.key.Public()
	var claims signClaims
	if err := jwt.Claims(&pub, &claims); err != nil {
		t.Fatalf("verify token with the provisioner's public key: %v", err)
	}
	now := clock.Now()
	sum := sha256.Sum256(s.Root.Raw)
	checks := []struct {
		name      string
		got, want any
	}{
		{"iss", claims.Issuer, s.Provisioner},
		{"aud", []string(claims.Audience), []string{s.URL + "/1.0/sign"}},
		{"sub", claims.Subject, "spiffe://example.org"},
		{"sans", claims.SANs, []string{"spiffe://example.org"}},
		{"sha", claims.SHA, hex.EncodeToString(sum[:])},
		{"iat", claims.IssuedAt.Time(), now},
		{"nbf", claims.NotBefore.Time(), now},
		{"exp", claims.Expiry.Time(), now.Add(5 * time.Minute)},
	}
	for _, ch := range checks {
		switch g := ch.got.(type) {
		case []string:
			if !slices.Equal(g, ch.want.([]string)) {
				t.Errorf("%s = %v, want %v", ch.name, g, ch.want)
			}
		case time.Time:
			if !g.Equal(ch.want.(time.Time)) {
				t.Errorf("%s = %v, want %v", ch.name, g, ch.want)
			}
		default:
			if ch.got != ch.want {
				t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
			}
		}
	}
	if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(claims.ID) {
		t.Errorf("jti = %q, want 32 random bytes in hex", claims.ID)
	}
	tok2, err := c.token("spiffe://example.org", nil)
	if err != nil {
		t.Fatal(err)
	}
	if tok2 == tok {
		t.Error("two tokens are identical")
	}
}
