package agent

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// BenchmarkFetchX509SVID measures one FetchX509SVID through go-spiffe's
// client over the unix socket: handshake with peer credentials,
// attestation from /proc, matching and the response.
func BenchmarkFetchX509SVID(b *testing.B) {
	e := newEnv(b)
	c := e.client()
	b.ResetTimer()
	for range b.N {
		if _, err := c.FetchX509SVID(e.ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFetchJWTSVIDCached measures FetchJWTSVID when the token is
// cached (no call to writd).
func BenchmarkFetchJWTSVIDCached(b *testing.B) {
	e := newEnv(b)
	c := e.client()
	p := jwtsvid.Params{Audience: "svc-b"}
	if _, err := c.FetchJWTSVID(e.ctx, p); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		if _, err := c.FetchJWTSVID(e.ctx, p); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAttestPeer measures Selectors alone: /proc reads, the pidfd
// check and user/group lookups.
func BenchmarkAttestPeer(b *testing.B) {
	info := selfPeerInfo(b)
	b.ResetTimer()
	for range b.N {
		if _, errs := info.Selectors(); len(errs) != 0 {
			b.Fatal(errs)
		}
	}
}
