package authority

import (
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/writmesh/writ/config"
)

func TestJWTSVID(t *testing.T) {
	pool := newPool(t)
	// jwtsvid validates expiry against the real time, so this clock stays
	// at it.
	clk := newClock()
	ca := newCA(t, pool, clk, "a", testKEK(t), nil)
	id := workloadID("api")
	got, err := ca.SignJWTSVID(ctxT(t), id, []string{"billing"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if d := got.ExpiresAt.Sub(clk.Now()); d != 5*time.Minute {
		t.Errorf("default lifetime %s, want 5m", d)
	}
	svid, err := jwtsvid.ParseAndValidate(got.Token, bundleOf(t, ca), []string{"billing"})
	if err != nil {
		t.Fatalf("jwtsvid.ParseAndValidate: %v", err)
	}
	if svid.ID != id || svid.Audience[0] != "billing" || !svid.Expiry.Equal(got.ExpiresAt) {
		t.Fatalf("svid %+v", svid)
	}
	tok, err := jwt.ParseSigned(got.Token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil || tok.Headers[0].KeyID != got.KeyID || tok.Headers[0].Algorithm != "ES256" {
		t.Fatalf("header %+v, %v", tok.Headers, err)
	}
	if _, err := jwtsvid.ParseAndValidate(got.Token, bundleOf(t, ca), []string{"other"}); err == nil {
		t.Error("token accepted for another audience")
	}
	capped, err := ca.SignJWTSVID(ctxT(t), id, []string{"a", "b"}, 100*time.Hour)
	if err != nil || capped.ExpiresAt.Sub(clk.Now()) != config.DefaultJWTSVIDMaxTTL {
		t.Errorf("ttl 100h: expires in %s (%v), want %s", capped.ExpiresAt.Sub(clk.Now()), err, config.DefaultJWTSVIDMaxTTL)
	}
	for name, c := range map[string]struct {
		id  spiffeid.ID
		aud []string
	}{
		"no audience":        {id, nil},
		"empty audience":     {id, []string{""}},
		"other trust domain": {spiffeid.RequireFromString("spiffe://evil.org/x"), []string{"a"}},
		"too many audiences": {id, strings.Split(strings.Repeat("a,", 20), ",")[:20]},
	} {
		if _, err := ca.SignJWTSVID(ctxT(t), c.id, c.aud, 0); err == nil {
			t.Errorf("%s: signed", name)
		}
	}
}

// TestJWTKeyRotationPublishesBeforeUse steps two replicas through several
// JWT key rotations at their poll interval (half a refresh hint): every
// token's key must have been in the bundle a verifier fetched from a
// replica one refresh hint before (except the trust domain's very first
// key), and stay in the bundle while the token is valid.
func TestJWTKeyRotationPublishesBeforeUse(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	kek := testKEK(t)
	mod := func(o *Options) {
		o.Config.BundleRefreshHint = config.Duration(time.Minute)
		o.Config.JWTKeyTTL = config.Duration(time.Hour)
		o.Config.JWTSVIDMaxTTL = config.Duration(5 * time.Minute)
	}
	a := newCA(t, pool, clk, "a", kek, mod)
	b := newCA(t, pool, clk, "b", kek, mod)
	firstKID := a.jwtCur.kid
	// The second replica signs at once, with the key verifiers already
	// hold, while its own is being published.
	if j, err := b.SignJWTSVID(ctxT(t), workloadID("b"), []string{"x"}, 0); err != nil || j.KeyID != firstKID {
		t.Fatalf("second replica at start: %v, want a token under the published key %s", err, firstKID)
	}
	type tok struct {
		*IssuedJWT
		step int
	}
	var live []tok
	var history []*spiffebundle.Bundle
	kids := map[string]bool{}
	for step := 0; step < 360; step++ {
		if step > 0 {
			clk.Advance(a.set.pollInterval())
			for _, ca := range []*CA{a, b} {
				if err := ca.tick(ctxT(t)); err != nil {
					t.Fatalf("step %d: %v", step, err)
				}
			}
		}
		history = append(history, bundleOf(t, a))
		for _, ca := range []*CA{a, b} {
			j, err := ca.SignJWTSVID(ctxT(t), workloadID(ca.replica), []string{"x"}, 0)
			if err != nil {
				t.Fatalf("step %d: replica %s: %v", step, ca.replica, err)
			}
			kids[j.KeyID] = true
			if j.KeyID != firstKID && (step < 2 || !history[step-2].HasJWTAuthority(j.KeyID)) {
				t.Fatalf("step %d: replica %s signed with key %s not in the bundle a refresh hint ago", step, ca.replica, j.KeyID)
			}
			live = append(live, tok{j, step})
		}
		now := clk.Now()
		cur := history[step]
		kept := live[:0]
		for _, l := range live {
			if !now.Before(l.ExpiresAt) {
				continue
			}
			kept = append(kept, l)
			key, ok := cur.FindJWTAuthority(l.KeyID)
			if !ok {
				t.Fatalf("step %d: key %s of a token from step %d left the bundle while the token is valid", step, l.KeyID, l.step)
			}
			parsed, err := jwt.ParseSigned(l.Token, []jose.SignatureAlgorithm{jose.ES256})
			if err != nil {
				t.Fatal(err)
			}
			var c jwt.Claims
			if err := parsed.Claims(key, &c); err != nil {
				t.Fatalf("step %d: token from step %d does not verify with the bundle's key: %v", step, l.step, err)
			}
		}
		live = kept
	}
	if len(kids) < 6 {
		t.Fatalf("%d keys used in 3h with 1h keys on two replicas, want at least 6", len(kids))
	}
	final := bundleOf(t, a)
	if final.HasJWTAuthority(firstKID) {
		t.Fatal("expired first key still in the bundle")
	}
	if n := len(final.JWTAuthorities()); n > 4 {
		t.Fatalf("bundle holds %d JWT keys, want at most two per replica", n)
	}
}

// A replica that restarts (a new process, a new replica id) goes on issuing
// JWT-SVIDs at once, under a key that a bundle fetched before the restart
// already holds.
func TestRestartedReplicaSignsJWTsAtOnce(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	kek := testKEK(t)
	a := newCA(t, pool, clk, "a", kek, nil)
	before := bundleOf(t, a)
	a.stop()
	clk.Advance(time.Minute)
	restarted := newCA(t, pool, clk, "a-restarted", kek, nil)
	j, err := restarted.SignJWTSVID(ctxT(t), workloadID("web"), []string{"x"}, 0)
	if err != nil {
		t.Fatalf("restarted replica cannot sign jwt-svids: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(j.Token, before, []string{"x"}); err != nil {
		t.Fatalf("token from the restarted replica does not validate against the bundle from before the restart: %v", err)
	}
	// The sealed key opens only with the KEK.
	var sealed []byte
	if err := pool.QueryRow(ctxT(t), `SELECT key_sealed FROM jwt_keys WHERE kid = $1`, j.KeyID).Scan(&sealed); err != nil {
		t.Fatal(err)
	}
	if _, err := unseal(testKEK(t), jwtAAD(j.KeyID), "jwt key", sealed); err == nil {
		t.Fatal("a sealed jwt key opened with another KEK")
	}
}
