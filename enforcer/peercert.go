package enforcer

import (
	"crypto/x509"
	"encoding/pem"
	"net/url"
	"strings"
	"sync"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
)

// PeerCertificate is how a CheckRequest carries the client's certificate
// in attributes.source.certificate: URL-encoded PEM, as Envoy sends it
// with the ext_authz filter's include_peer_certificate. writ-proxy fills
// it the same way, once per connection.
func PeerCertificate(cert *x509.Certificate) string {
	return url.PathEscape(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})))
}

// peerNotAfter is the NotAfter of the certificate in
// attributes.source.certificate (zero when there is none or it does not
// parse). Connections carry one certificate for many requests, so parsed
// expiries are kept by the certificate's text; the cache is dropped
// whole when it fills, which costs only re-parsing. It is bounded in
// bytes as well as entries, and keeps only certificates that parse: a
// client talking to writ-enforcer directly chooses this text, and could
// otherwise make it hold 4,096 messages' worth of junk.
type peerNotAfter struct {
	mu    sync.RWMutex
	m     map[string]time.Time
	bytes int
}

const (
	peerCertCacheMax   = 4096
	peerCertCacheBytes = 4 << 20
	// peerCertKeyMax is far above a URL-encoded PEM leaf (2-4 KiB).
	peerCertKeyMax = 16 << 10
)

func (c *peerNotAfter) get(s string) time.Time {
	if s == "" {
		return time.Time{}
	}
	c.mu.RLock()
	t, ok := c.m[s]
	c.mu.RUnlock()
	if ok {
		return t
	}
	t = parseNotAfter(s)
	if t.IsZero() || len(s) > peerCertKeyMax {
		return t
	}
	c.mu.Lock()
	if c.m == nil || len(c.m) >= peerCertCacheMax || c.bytes+len(s) > peerCertCacheBytes {
		c.m, c.bytes = make(map[string]time.Time), 0
	}
	if _, ok := c.m[s]; !ok {
		c.m[s] = t
		c.bytes += len(s)
	}
	c.mu.Unlock()
	return t
}

func parseNotAfter(s string) time.Time {
	// PEM itself holds no '%': anything with one is URL-encoded.
	if strings.Contains(s, "%") {
		u, err := url.PathUnescape(s)
		if err != nil {
			return time.Time{}
		}
		s = u
	}
	b, _ := pem.Decode([]byte(s))
	if b == nil || b.Type != "CERTIFICATE" {
		return time.Time{}
	}
	cert, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return time.Time{}
	}
	return cert.NotAfter.UTC()
}

// recordTransport sets d's mTLS facts from the request's source peer:
// Envoy (and writ-proxy) set a principal or certificate only for a peer
// that presented a verified client certificate.
func (e *Enforcer) recordTransport(d *Decision, req *authv3.CheckRequest) {
	src := req.GetAttributes().GetSource()
	cert := src.GetCertificate()
	d.MTLS = cert != "" || src.GetPrincipal() != ""
	d.PeerCertNotAfter = e.peerCerts.get(cert)
}
