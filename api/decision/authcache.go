package decision

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// maxAuthCache bounds each credential cache; a full cache is emptied.
const maxAuthCache = 4096

// authCache remembers credentials already verified, so that a caller on a
// kept-alive connection or reusing its token costs a map lookup instead of
// ECDSA verifications (most of a request's time otherwise). A hit is
// re-checked against the present: the root or JWT key that verified the
// credential must still be in the current bundle, and the credential
// still valid on the clock, so a rotation that drops a root or key takes
// effect at once. Safe for concurrent use.
type authCache struct {
	mu   sync.Mutex
	x509 map[[32]byte]x509Hit
	jwt  map[[32]byte]jwtHit
}

type x509Hit struct {
	id                  spiffeid.ID
	root                *x509.Certificate
	notBefore, notAfter time.Time
}

type jwtHit struct {
	id     spiffeid.ID
	kid    string
	expiry time.Time
}

func chainKey(certs []*x509.Certificate) [32]byte {
	h := sha256.New()
	var n [8]byte
	for _, c := range certs {
		binary.BigEndian.PutUint64(n[:], uint64(len(c.Raw)))
		h.Write(n[:])
		h.Write(c.Raw)
	}
	var k [32]byte
	h.Sum(k[:0])
	return k
}

// x509Lookup returns the cached ID of certs if it still verifies at now.
func (c *authCache) x509Lookup(certs []*x509.Certificate, bundles x509bundle.Source, now time.Time) (spiffeid.ID, bool) {
	k := chainKey(certs)
	c.mu.Lock()
	hit, ok := c.x509[k]
	c.mu.Unlock()
	if !ok || now.Before(hit.notBefore) || now.After(hit.notAfter) {
		return spiffeid.ID{}, false
	}
	b, err := bundles.GetX509BundleForTrustDomain(hit.id.TrustDomain())
	if err != nil || !b.HasX509Authority(hit.root) {
		return spiffeid.ID{}, false
	}
	return hit.id, true
}

// x509Store remembers a chain that verified as id through chain.
func (c *authCache) x509Store(certs []*x509.Certificate, id spiffeid.ID, chain []*x509.Certificate) {
	if len(chain) == 0 {
		return
	}
	hit := x509Hit{id: id, root: chain[len(chain)-1], notAfter: chain[0].NotAfter, notBefore: chain[0].NotBefore}
	for _, cert := range chain {
		if cert.NotBefore.After(hit.notBefore) {
			hit.notBefore = cert.NotBefore
		}
		if cert.NotAfter.Before(hit.notAfter) {
			hit.notAfter = cert.NotAfter
		}
	}
	k := chainKey(certs)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.x509 == nil || len(c.x509) >= maxAuthCache {
		c.x509 = map[[32]byte]x509Hit{}
	}
	c.x509[k] = hit
}

// jwtLookup returns the cached ID of tok if it is unexpired at now and its
// key is still in the bundle.
func (c *authCache) jwtLookup(tok string, bundles jwtbundle.Source, now time.Time) (spiffeid.ID, bool) {
	k := sha256.Sum256([]byte(tok))
	c.mu.Lock()
	hit, ok := c.jwt[k]
	c.mu.Unlock()
	if !ok || !now.Before(hit.expiry) {
		return spiffeid.ID{}, false
	}
	b, err := bundles.GetJWTBundleForTrustDomain(hit.id.TrustDomain())
	if err != nil || !b.HasJWTAuthority(hit.kid) {
		return spiffeid.ID{}, false
	}
	return hit.id, true
}

// jwtStore remembers a token that validated as id until expiry.
func (c *authCache) jwtStore(tok string, id spiffeid.ID, expiry time.Time) {
	kid := tokenKeyID(tok)
	if kid == "" {
		return
	}
	k := sha256.Sum256([]byte(tok))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.jwt == nil || len(c.jwt) >= maxAuthCache {
		c.jwt = map[[32]byte]jwtHit{}
	}
	c.jwt[k] = jwtHit{id: id, kid: kid, expiry: expiry}
}

// tokenKeyID reads the kid of a compact JWS already validated.
func tokenKeyID(tok string) string {
	head, _, ok := strings.Cut(tok, ".")
	if !ok {
		return ""
	}
	b, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil {
		return ""
	}
	var h struct {
		KID string `json:"kid"`
	}
	if json.Unmarshal(b, &h) != nil {
		return ""
	}
	return h.KID
}
