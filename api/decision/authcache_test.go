package decision

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// A cached credential counts only while its root or key is in the bundle
// and it is within its validity.
func TestAuthCache(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	id := spiffeid.RequireFromPath(td, "/ns/a/sa/b")
	now := time.Now()
	root := &x509.Certificate{Raw: []byte("root"), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour)}
	inter := &x509.Certificate{Raw: []byte("intermediate"), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(12 * time.Hour)}
	leaf := &x509.Certificate{Raw: []byte("leaf"), NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour)}
	peer := []*x509.Certificate{leaf, inter}
	xb := x509bundle.New(td)
	xb.AddX509Authority(root)

	var c authCache
	if _, ok := c.x509Lookup(peer, xb, now); ok {
		t.Fatal("hit in an empty cache")
	}
	c.x509Store(peer, id, []*x509.Certificate{leaf, inter, root})
	if got, ok := c.x509Lookup(peer, xb, now); !ok || got != id {
		t.Fatalf("lookup = %v, %v; want %v", got, ok, id)
	}
	if _, ok := c.x509Lookup([]*x509.Certificate{leaf}, xb, now); ok {
		t.Error("hit for a different chain")
	}
	if _, ok := c.x509Lookup(peer, xb, now.Add(2*time.Hour)); ok {
		t.Error("hit after the leaf expired")
	}
	if _, ok := c.x509Lookup(peer, xb, now.Add(-30*time.Minute)); ok {
		t.Error("hit before the leaf was valid")
	}
	xb.RemoveX509Authority(root)
	if _, ok := c.x509Lookup(peer, xb, now); ok {
		t.Error("hit after the root left the bundle")
	}

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jb := jwtbundle.New(td)
	if err := jb.AddJWTAuthority("k1", key.Public()); err != nil {
		t.Fatal(err)
	}
	tok := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"ES256","kid":"k1","typ":"JWT"}`)) + ".e30.sig"
	c.jwtStore(tok, id, now.Add(5*time.Minute))
	if got, ok := c.jwtLookup(tok, jb, now); !ok || got != id {
		t.Fatalf("jwt lookup = %v, %v", got, ok)
	}
	if _, ok := c.jwtLookup(tok+"x", jb, now); ok {
		t.Error("hit for another token")
	}
	if _, ok := c.jwtLookup(tok, jb, now.Add(5*time.Minute)); ok {
		t.Error("hit at expiry")
	}
	jb.RemoveJWTAuthority("k1")
	if _, ok := c.jwtLookup(tok, jb, now); ok {
		t.Error("hit after the key left the bundle")
	}

	for i := range maxAuthCache + 10 {
		c.jwtStore(fmt.Sprintf("%s%d", tok, i), id, now.Add(time.Minute))
	}
	if n := len(c.jwt); n > maxAuthCache {
		t.Errorf("%d cached tokens, want at most %d", n, maxAuthCache)
	}
}
