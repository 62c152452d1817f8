package authority_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/store/pgtest"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func newRegistry(t *testing.T) (*authority.Registry, *clockwork.FakeClock) {
	t.Helper()
	clock := clockwork.NewFakeClockAt(time.Now())
	return authority.NewRegistry(pgtest.NewMigrated(t), td, clock), clock
}

func TestJoinTokenIsOneTime(t *testing.T) {
	reg, _ := newRegistry(t)
	ctx := context.Background()
	tok, err := reg.CreateJoinToken(ctx, "spiffe://example.org/node/n1", 10*time.Minute, "uid:0")
	if err != nil {
		t.Fatal(err)
	}
	// Many concurrent uses: exactly one wins.
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id, err := reg.ConsumeJoinToken(ctx, tok.Token, "test")
			if err == nil {
				mu.Lock()
				wins++
				mu.Unlock()
				if got, want := id.String(), "spiffe://example.org/node/n1"; got != want {
					t.Errorf("id = %s, want %s", got, want)
				}
			}
		}()
	}
	wg.Wait()
	if wins != 1 {
		t.Fatalf("token consumed %d times, want once", wins)
	}
	_, err = reg.ConsumeJoinToken(ctx, tok.Token, "test")
	if err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("reuse error = %v, want 'already used'", err)
	}
}

func TestJoinTokenExpiresAndUnknown(t *testing.T) {
	reg, clock := newRegistry(t)
	ctx := context.Background()
	tok, err := reg.CreateJoinToken(ctx, "spiffe://example.org/node/n1", time.Minute, "uid:0")
	if err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Minute)
	if _, err := reg.ConsumeJoinToken(ctx, tok.Token, "test"); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired token error = %v", err)
	}
	if _, err := reg.ConsumeJoinToken(ctx, "nope", "test"); err == nil || !strings.Contains(err.Error(), "unknown") {
		t.Fatalf("unknown token error = %v", err)
	}
}

func TestJoinTokenNotStoredInClear(t *testing.T) {
	pool := pgtest.NewMigrated(t)
	reg := authority.NewRegistry(pool, td, nil)
	ctx := context.Background()
	tok, err := reg.CreateJoinToken(ctx, "spiffe://example.org/node/n1", time.Minute, "uid:0")
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM join_tokens WHERE position($1::bytea in token_hash) > 0`, []byte(tok.Token)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatal("the token is stored in clear")
	}
}

func TestCreateJoinTokenRefusals(t *testing.T) {
	reg, _ := newRegistry(t)
	for _, tt := range []struct {
		id   string
		ttl  time.Duration
		want string
	}{
		{"spiffe://other.org/node/n1", time.Minute, "outside trust domain"},
		{"spiffe://example.org/ns/default/sa/web", time.Minute, "must look like spiffe://example.org/node/NAME"},
		{"not a url", time.Minute, "invalid SPIFFE ID"},
		{"spiffe://example.org/node/n1", 0, "must be positive"},
		{"spiffe://example.org/node/n1", 48 * time.Hour, "at most"},
	} {
		_, err := reg.CreateJoinToken(context.Background(), tt.id, tt.ttl, "uid:0")
		var ie *authority.InputError
		if !errors.As(err, &ie) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("CreateJoinToken(%q, %s) = %v, want input error containing %q", tt.id, tt.ttl, err, tt.want)
		}
	}
}

func TestEntries(t *testing.T) {
	reg, _ := newRegistry(t)
	ctx := context.Background()
	in := authority.EntryInput{SPIFFEID: "spiffe://example.org/ns/default/sa/web", ParentID: "spiffe://example.org/node/n1",
		Selectors: []string{"unix:uid:1000", "unix:gid:1000"}, X509TTL: 30 * time.Minute}
	e, err := reg.CreateEntry(ctx, in, "uid:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reg.CreateEntry(ctx, in, "uid:0"); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("duplicate entry error = %v", err)
	}
	other := in
	other.ParentID = "spiffe://example.org/node/n2"
	if _, err := reg.CreateEntry(ctx, other, "uid:0"); err != nil {
		t.Fatal(err)
	}
	n1 := spiffeid.RequireFromString("spiffe://example.org/node/n1")
	list, err := reg.ListEntries(ctx, &n1)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != e.ID {
		t.Fatalf("entries of n1 = %v, want just %s", list, e.ID)
	}
	got, err := reg.GetEntry(ctx, e.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.X509TTL != 30*time.Minute || got.SPIFFEID.String() != in.SPIFFEID || len(got.Selectors) != 2 {
		t.Fatalf("entry round trip = %+v", got)
	}
	if err := reg.DeleteEntry(ctx, e.ID); err != nil {
		t.Fatal(err)
	}
	if err := reg.DeleteEntry(ctx, e.ID); !errors.Is(err, authority.ErrNotFound) {
		t.Fatalf("second delete = %v, want ErrNotFound", err)
	}
	if _, err := reg.GetEntry(ctx, "'; DROP TABLE x; --"); !errors.Is(err, authority.ErrNotFound) {
		t.Fatalf("bad id = %v, want ErrNotFound", err)
	}
}

func TestCreateEntryRefusals(t *testing.T) {
	reg, _ := newRegistry(t)
	base := authority.EntryInput{SPIFFEID: "spiffe://example.org/ns/default/sa/web", ParentID: "spiffe://example.org/node/n1", Selectors: []string{"unix:uid:1000"}}
	for _, tt := range []struct {
		name string
		mod  func(*authority.EntryInput)
		want string
	}{
		{"foreign id", func(e *authority.EntryInput) { e.SPIFFEID = "spiffe://evil.org/ns/default/sa/web" }, "outside trust domain"},
		{"node path", func(e *authority.EntryInput) { e.SPIFFEID = "spiffe://example.org/node/n2" }, "reserved"},
		{"control plane path", func(e *authority.EntryInput) { e.SPIFFEID = "spiffe://example.org/writ/control-plane" }, "reserved"},
		{"parent not a node", func(e *authority.EntryInput) { e.ParentID = "spiffe://example.org/ns/x/sa/y" }, "parent"},
		{"no selectors", func(e *authority.EntryInput) { e.Selectors = nil }, "at least one selector"},
		{"bad selector", func(e *authority.EntryInput) { e.Selectors = []string{"unix:uid:abc"} }, "decimal"},
		{"negative ttl", func(e *authority.EntryInput) { e.X509TTL = -time.Second }, "ttl"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			in := base
			tt.mod(&in)
			_, err := reg.CreateEntry(context.Background(), in, "uid:0")
			var ie *authority.InputError
			if !errors.As(err, &ie) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want input error containing %q", err, tt.want)
			}
		})
	}
}
