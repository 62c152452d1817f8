package agent

import (
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/authority/nodeapi"
)

func TestParseEntry(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString(testTD)
	node := spiffeid.RequireFromString("spiffe://example.org/node/n1")
	ok := func() *nodeapi.Entry {
		return &nodeapi.Entry{Id: "e1", SpiffeId: webID, ParentId: node.String(), Selectors: []string{"unix:uid:0"}}
	}
	tests := []struct {
		name    string
		mod     func(*nodeapi.Entry)
		wantErr string
	}{
		{"valid", func(*nodeapi.Entry) {}, ""},
		{"no parent given", func(e *nodeapi.Entry) { e.ParentId = "" }, ""},
		{"empty id", func(e *nodeapi.Entry) { e.Id = "" }, "entry id"},
		{"huge id", func(e *nodeapi.Entry) { e.Id = strings.Repeat("x", 300) }, "entry id"},
		{"bad spiffe id", func(e *nodeapi.Entry) { e.SpiffeId = "web" }, "spiffe id"},
		{"other trust domain", func(e *nodeapi.Entry) { e.SpiffeId = "spiffe://evil.org/ns/default/sa/web" }, "outside trust domain"},
		{"other node's entry", func(e *nodeapi.Entry) { e.ParentId = "spiffe://example.org/node/n2" }, "not this node"},
		{"no selectors", func(e *nodeapi.Entry) { e.Selectors = nil }, "selectors"},
		{"bad selector", func(e *nodeapi.Entry) { e.Selectors = []string{"k8s:ns:default"} }, "selectors"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := ok()
			tt.mod(in)
			_, err := parseEntry(in, td, node)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("got %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestApplyBundle(t *testing.T) {
	w := newFakeWritd(t, clockwork.NewFakeClock())
	a, err := New(Config{ControlPlane: "x:1", JoinToken: "t", TrustDomain: w.td,
		TrustBundle: spiffebundle.FromX509Authorities(w.td, []*x509.Certificate{w.root})})
	if err != nil {
		t.Fatal(err)
	}
	msg := func(b *spiffebundle.Bundle, seq uint64, td string) *nodeapi.Bundle {
		doc, err := b.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return &nodeapi.Bundle{TrustDomain: td, SpiffeBundle: doc, Sequence: seq}
	}
	changed := a.changed
	if got, err := a.applyBundle(msg(w.bundle, 5, testTD)); err != nil || !got {
		t.Fatalf("newer bundle: changed %v, err %v", got, err)
	}
	select {
	case <-changed:
	default:
		t.Fatal("streams not woken by a bundle change")
	}
	if got, err := a.applyBundle(msg(w.bundle, 5, testTD)); err != nil || got {
		t.Fatalf("same bundle: changed %v, err %v", got, err)
	}
	other := spiffebundle.FromX509Authorities(w.td, []*x509.Certificate{w.sign(t, w.td.ID(), mustKey(t).Public(), time.Hour)})
	if got, err := a.applyBundle(msg(other, 4, testTD)); err != nil || got {
		t.Fatalf("older bundle: changed %v, err %v", got, err)
	}
	if !a.currentBundle().Equal(w.bundle) {
		t.Fatal("an older bundle replaced a newer one")
	}
	if _, err := a.applyBundle(msg(w.bundle, 6, "evil.org")); err == nil {
		t.Fatal("bundle of another trust domain accepted")
	}
	if _, err := a.applyBundle(msg(spiffebundle.New(w.td), 7, testTD)); err == nil {
		t.Fatal("bundle without X.509 authorities accepted")
	}
	if _, err := a.applyBundle(&nodeapi.Bundle{TrustDomain: testTD, SpiffeBundle: []byte("{"), Sequence: 8}); err == nil {
		t.Fatal("malformed bundle accepted")
	}
}

func TestRenewTimeAndBackoff(t *testing.T) {
	a, err := New(Config{ControlPlane: "x:1", JoinToken: "t", TrustDomain: spiffeid.RequireTrustDomainFromString(testTD),
		TrustBundle: func() *spiffebundle.Bundle {
			w := newFakeWritd(t, clockwork.NewFakeClock())
			return spiffebundle.FromX509Authorities(w.td, []*x509.Certificate{w.root})
		}(),
		Jitter: func(max time.Duration) time.Duration { return max - 1 }, // the most jitter
	})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_000_000, 0)
	// One hour left: renew between 24 and 30 minutes from now.
	got := a.renewTime(now, now.Add(time.Hour)).Sub(now)
	if got < 24*time.Minute || got > 30*time.Minute {
		t.Fatalf("renew after %s, want within [24m, 30m]", got)
	}
	if got := a.renewTime(now, now.Add(-time.Second)); !got.Equal(now) {
		t.Fatalf("expired SVID renews at %s, want now", got)
	}
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 30: maxBackoff} {
		got := a.backoff(n)
		if got < want || got > want+want/5 {
			t.Errorf("backoff(%d) = %s, want %s plus at most 20%%", n, got, want)
		}
	}
}
