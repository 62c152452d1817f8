package authority

import (
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"

	"github.com/writmesh/writ/config"
)

// TestRootRotation runs a full root rotation on two replicas, one of which
// lags (it polls every other step), minute by minute. At every step every
// unexpired SVID, issued before, during or after the rotation, must verify
// against each replica's current bundle and against the bundle a verifier
// fetched one refresh hint ago; and the new root must have been in the
// bundle for two refresh hints before the first SVID chains to it.
func TestRootRotation(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	kek := testKEK(t)
	mod := func(o *Options) {
		o.Config.BundleRefreshHint = config.Duration(time.Minute)
		o.Config.IntermediateTTL = config.Duration(6 * time.Hour)
		o.Config.X509SVIDMaxTTL = config.Duration(2 * time.Hour)
	}
	a := newCA(t, pool, clk, "a", kek, mod)
	b := newCA(t, pool, clk, "b", kek, mod)
	oldRoot := a.Roots()[0]

	st, err := a.RootRotationStatus(ctxT(t))
	if err != nil || st.Phase != RotationIdle || st.ActiveRootID != rootID(oldRoot.Raw) {
		t.Fatalf("status before = %+v, %v; want idle with the first root active", st, err)
	}

	type issued struct {
		svid *IssuedX509
		step int
	}
	var live []issued
	var history []*spiffebundle.Bundle // history[i]: b's bundle after step i
	var newRoot *x509.Certificate
	firstUnderNew := -1
	phases := map[RotationPhase]int{}
	const rotateAt = 5
	step := 0
	for ; step < 300; step++ {
		if step > 0 {
			clk.Advance(time.Minute)
			if err := a.tick(ctxT(t)); err != nil {
				t.Fatalf("step %d: tick a: %v", step, err)
			}
			if step%2 == 0 {
				if err := b.tick(ctxT(t)); err != nil {
					t.Fatalf("step %d: tick b: %v", step, err)
				}
			}
		}
		if step == rotateAt {
			st, err := b.RotateRoot(ctxT(t))
			if err != nil {
				t.Fatalf("RotateRoot: %v", err)
			}
			if st.Phase != RotationPrepared || st.NextStepAt != clk.Now().Add(2*time.Minute) {
				t.Fatalf("status after RotateRoot = %+v", st)
			}
			if _, err := a.RotateRoot(ctxT(t)); err == nil || !strings.Contains(err.Error(), "already in progress") {
				t.Fatalf("second RotateRoot: err = %v, want already in progress", err)
			}
			for _, r := range bundleOf(t, b).X509Authorities() {
				if !r.Equal(oldRoot) {
					newRoot = r
				}
			}
			if newRoot == nil {
				t.Fatal("new root not in the bundle after RotateRoot")
			}
		}
		now := clk.Now()
		for _, ca := range []*CA{a, b} {
			s := sign(t, ca, workloadID(ca.replica), 0)
			live = append(live, issued{s, step})
			if newRoot != nil && s.Chain[1].CheckSignatureFrom(newRoot) == nil && firstUnderNew < 0 {
				firstUnderNew = step
				// Published two refresh hints (two steps) before use.
				if step < 2 || !history[step-2].HasX509Authority(newRoot) {
					t.Fatalf("step %d: first SVID under the new root, but the bundle two refresh hints ago lacked it", step)
				}
			}
		}
		history = append(history, bundleOf(t, b))
		stale := history[max(0, step-1)]
		kept := live[:0]
		for _, l := range live {
			if !now.Before(l.svid.NotAfter) {
				continue
			}
			kept = append(kept, l)
			mustVerify(t, "current bundle of a", l.svid, bundleOf(t, a), now)
			mustVerify(t, "current bundle of b", l.svid, history[step], now)
			mustVerify(t, "bundle fetched a refresh hint ago", l.svid, stale, now)
		}
		live = kept
		st, err := a.RootRotationStatus(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if _, seen := phases[st.Phase]; !seen {
			phases[st.Phase] = step
		}
		if st.Phase == RotationDone {
			break
		}
	}
	if step == 300 {
		t.Fatalf("rotation did not finish; phases seen %v", phases)
	}
	t.Logf("phases first seen at steps %v; first SVID under new root at step %d", phases, firstUnderNew)
	if phases[RotationPrepared] != rotateAt || phases[RotationSwitched] != rotateAt+2 {
		t.Errorf("phases at steps %v: want prepared at %d, switched at %d", phases, rotateAt, rotateAt+2)
	}
	// The old root leaves only after the last SVID under it expired: b
	// switched at the first even step after the switch and had signed a 1h
	// SVID just before.
	if got, min := phases[RotationDone], rotateAt+2+1+60; got < min {
		t.Errorf("old root retired at step %d, before its last SVID expired (step %d)", got, min)
	}
	final := bundleOf(t, a)
	if final.HasX509Authority(oldRoot) || !final.HasX509Authority(newRoot) || len(final.X509Authorities()) != 1 {
		t.Fatalf("final bundle authorities %d, old present %v, new present %v", len(final.X509Authorities()), final.HasX509Authority(oldRoot), final.HasX509Authority(newRoot))
	}
	st, err = b.RootRotationStatus(ctxT(t))
	if err != nil || st.Phase != RotationDone || st.OldRootID != rootID(oldRoot.Raw) || st.NewRootID != rootID(newRoot.Raw) || st.CompletedAt.IsZero() {
		t.Fatalf("final status %+v, %v", st, err)
	}
	if got := countRows(t, pool, "SELECT count(*) FROM ca_roots WHERE state = 'retired'"); got != 1 {
		t.Fatalf("retired roots = %d", got)
	}
	// A new rotation may start once the last one is done.
	if _, err := a.RotateRoot(ctxT(t)); err != nil {
		t.Fatalf("RotateRoot after done: %v", err)
	}
}

// TestRootRetirementWaitsForSilentReplica: a replica that neither switches
// nor says it stopped holds the old root in the bundle until its
// intermediate expires, since it might still sign under it.
func TestRootRetirementWaitsForSilentReplica(t *testing.T) {
	pool := newPool(t)
	clk := newClock()
	kek := testKEK(t)
	mod := func(o *Options) {
		o.Config.BundleRefreshHint = config.Duration(time.Minute)
		o.Config.IntermediateTTL = config.Duration(4 * time.Hour)
	}
	a := newCA(t, pool, clk, "a", kek, mod)
	silent := newCA(t, pool, clk, "silent", kek, mod)
	silentInter := sign(t, silent, workloadID("s"), 0).Chain[1]
	if _, err := a.RotateRoot(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	clk.Advance(2 * time.Minute)
	if err := a.tick(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	st, err := a.RootRotationStatus(ctxT(t))
	if err != nil || st.Phase != RotationSwitched {
		t.Fatalf("status %+v, %v", st, err)
	}
	if !st.NextStepAt.Equal(silentInter.NotAfter) {
		t.Fatalf("retirement at %s, want the silent replica's intermediate expiry %s", st.NextStepAt, silentInter.NotAfter)
	}
	clk.Advance(3 * time.Hour)
	if err := a.tick(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.RootRotationStatus(ctxT(t)); st.Phase != RotationSwitched {
		t.Fatalf("phase %s before the silent replica's intermediate expired", st.Phase)
	}
	clk.Advance(time.Hour)
	if err := a.tick(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.RootRotationStatus(ctxT(t)); st.Phase != RotationDone {
		t.Fatalf("phase %s after the silent replica's intermediate expired", st.Phase)
	}
}
