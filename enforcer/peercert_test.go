package enforcer

import (
	"context"
	"encoding/pem"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/writmesh/writ/audit"
)

// TestCheckRecordsTransport: a decision records whether the caller came
// over mTLS and, when the request carries the caller's certificate
// (URL-encoded PEM as Envoy sends it, or plain PEM), its NotAfter, and
// the request event carries both as the attributes compliance reads.
func TestCheckRecordsTransport(t *testing.T) {
	rec := &recorder{}
	e := newEnforcer(t, policyDir(t, "package envoy.authz\n\ndefault allow := true\n"), rec, clockwork.NewFakeClock())
	ca := newTestCA(t, "example.org")
	leaf := ca.svid(t, "spiffe://example.org/ns/shop/sa/frontend").Certificates[0]
	plainPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw}))
	envoyStyle := url.QueryEscape(plainPEM) // Envoy escapes '+' and '/' too
	for _, c := range []struct {
		name, principal, cert string
		mtls                  bool
		notAfter              time.Time
	}{
		{"writ-proxy form", "spiffe://example.org/ns/shop/sa/frontend", PeerCertificate(leaf), true, leaf.NotAfter},
		{"envoy form", "spiffe://example.org/ns/shop/sa/frontend", strings.ReplaceAll(envoyStyle, "+", "%20"), true, leaf.NotAfter},
		{"plain PEM", "", plainPEM, true, leaf.NotAfter},
		{"principal only", "spiffe://example.org/ns/shop/sa/frontend", "", true, time.Time{}},
		{"unparseable certificate", "spiffe://example.org/ns/shop/sa/frontend", "not%20a%20cert", true, time.Time{}},
		{"plaintext", "", "", false, time.Time{}},
	} {
		req := simpleRequest(c.principal, "GET", "/x", nil)
		req.Attributes.Source.Certificate = c.cert
		for i := 0; i < 2; i++ { // the second time from the cache
			_, d := e.Check(context.Background(), req)
			if d.MTLS != c.mtls || !d.PeerCertNotAfter.Equal(c.notAfter) {
				t.Fatalf("%s: mtls %v not after %v, want %v %v", c.name, d.MTLS, d.PeerCertNotAfter, c.mtls, c.notAfter)
			}
			ev, err := DecisionEvent(d, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			a := string(ev.Attributes)
			if c.mtls != strings.Contains(a, `"mtls":true`) || !c.mtls && !strings.Contains(a, `"mtls":false`) {
				t.Fatalf("%s: attributes %s", c.name, a)
			}
			wantNA := ""
			if !c.notAfter.IsZero() {
				wantNA = `"peer_cert_not_after":"` + c.notAfter.UTC().Format(time.RFC3339) + `"`
			}
			if strings.Contains(a, "peer_cert_not_after") != (wantNA != "") || !strings.Contains(a, wantNA) {
				t.Fatalf("%s: attributes %s, want %s", c.name, a, wantNA)
			}
			if want, _ := audit.CanonicalJSON(ev.Attributes); string(want) != a {
				t.Fatalf("%s: attributes not canonical: %s", c.name, a)
			}
		}
	}
}

// TestPeerCertCacheBounded: the expiry cache keeps only certificates that
// parse, never a key beyond peerCertKeyMax, and never more than
// peerCertCacheBytes of keys, whatever text callers send.
func TestPeerCertCacheBounded(t *testing.T) {
	var c peerNotAfter
	junk := strings.Repeat("x", 1000)
	for i := range 2 * peerCertCacheMax {
		c.get(junk + strconv.Itoa(i))
	}
	if len(c.m) != 0 || c.bytes != 0 {
		t.Fatalf("junk cached: %d entries, %d bytes", len(c.m), c.bytes)
	}
	ca := newTestCA(t, "example.org")
	leaf := ca.svid(t, "spiffe://example.org/ns/shop/sa/frontend").Certificates[0]
	good := PeerCertificate(leaf)
	if got := c.get(good); !got.Equal(leaf.NotAfter.UTC()) || len(c.m) != 1 {
		t.Fatalf("a real certificate: %v, %d entries", got, len(c.m))
	}
	// The same certificate padded past the key bound (PEM allows text
	// around a block) still parses, and is not kept.
	long := good + url.PathEscape("\n"+strings.Repeat("y", peerCertKeyMax))
	if got := c.get(long); !got.Equal(leaf.NotAfter.UTC()) || len(c.m) != 1 {
		t.Fatalf("a padded certificate: %v, %d entries", got, len(c.m))
	}
	// Distinct parsable keys: the byte bound holds.
	for i := range 2 * peerCertCacheMax {
		c.get(good + url.PathEscape("\n"+strings.Repeat("z", 2000)+strconv.Itoa(i)))
		if c.bytes > peerCertCacheBytes || len(c.m) > peerCertCacheMax {
			t.Fatalf("cache at %d bytes, %d entries", c.bytes, len(c.m))
		}
	}
}
