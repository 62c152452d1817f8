package xds

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/store/pgtest"
)

const meshYAML = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: greeter, namespace: demo}
spec:
  ports: [{port: 50051, protocol: grpc}]
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: greeter, namespace: demo}
spec:
  service: greeter
  rules:
    - destinations:
        - {subset: v1, weight: 80}
        - {subset: v2, weight: 20}
`

func mustDecode(t testing.TB, y string) []*config.Resource {
	t.Helper()
	rs, err := config.DecodeMesh("test.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

func TestStoreApplyHistoryRollback(t *testing.T) {
	ctx := context.Background()
	clock := clockwork.NewFakeClockAt(time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC))
	s := NewStore(pgtest.NewMigrated(t), clock)

	chs, err := s.Apply(ctx, "uid:1", mustDecode(t, meshYAML), false)
	if err != nil {
		t.Fatal(err)
	}
	if len(chs) != 2 || chs[0].Op != "created" || chs[1].Op != "created" || chs[1].Revision != 1 {
		t.Fatalf("first apply: %+v", chs)
	}
	// Applying the same again changes nothing and bumps no generation.
	gen1, _, _ := s.Load(ctx)
	chs, err = s.Apply(ctx, "uid:1", mustDecode(t, meshYAML), false)
	if err != nil {
		t.Fatal(err)
	}
	if chs[0].Op != "unchanged" || chs[1].Op != "unchanged" {
		t.Fatalf("re-apply: %+v", chs)
	}
	if gen, _, _ := s.Load(ctx); gen != gen1 {
		t.Fatalf("generation moved on a no-op apply: %d -> %d", gen1, gen)
	}

	// An update: 50/50.
	clock.Advance(time.Minute)
	updated := strings.Replace(strings.Replace(meshYAML, "weight: 80", "weight: 50", 1), "weight: 20", "weight: 50", 1)
	chs, err = s.Apply(ctx, "uid:2", mustDecode(t, updated), true) // dry run first
	if err != nil {
		t.Fatal(err)
	}
	if chs[1].Op != "updated" || !strings.Contains(chs[1].Diff, "- ") || !strings.Contains(chs[1].Diff, "+ ") {
		t.Fatalf("dry run: %+v", chs[1])
	}
	r, rev, _ := s.Get(ctx, config.KindRoute, "demo", "greeter")
	if rev != 1 || r.Spec.(*config.RouteSpec).Rules[0].Destinations[0].Weight != 80 {
		t.Fatalf("dry run changed the store: rev %d", rev)
	}
	if _, err := s.Apply(ctx, "uid:2", mustDecode(t, updated), false); err != nil {
		t.Fatal(err)
	}
	h, err := s.History(ctx, config.KindRoute, "demo", "greeter")
	if err != nil {
		t.Fatal(err)
	}
	if len(h) != 2 || h[1].Author != "uid:2" || !h[1].At.Equal(clock.Now()) || !strings.Contains(h[1].Diff, "+ ") {
		t.Fatalf("history: %+v", h)
	}
	if _, err := s.Rollback(ctx, "uid:3", config.KindRoute, "demo", "greeter", 1); err != nil {
		t.Fatal(err)
	}
	r, rev, _ = s.Get(ctx, config.KindRoute, "demo", "greeter")
	if rev != 3 || r.Spec.(*config.RouteSpec).Rules[0].Destinations[0].Weight != 80 {
		t.Fatalf("after rollback: rev %d, %+v", rev, r.Spec)
	}

	// A delete that would leave a dangling route is refused; deleting the
	// route first works.
	if _, err := s.Delete(ctx, "uid:1", config.KindService, "demo", "greeter"); err == nil || !strings.Contains(err.Error(), "not declared") {
		t.Fatalf("delete of a routed service: %v", err)
	}
	if _, err := s.Delete(ctx, "uid:1", config.KindRoute, "demo", "greeter"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Get(ctx, config.KindRoute, "demo", "greeter"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if _, err := s.Delete(ctx, "uid:1", config.KindRoute, "demo", "greeter"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
}

func TestStoreApplyIsAllOrNothing(t *testing.T) {
	ctx := context.Background()
	s := NewStore(pgtest.NewMigrated(t), nil)
	// The second document refers to a subset nobody has: nothing is stored.
	bad := strings.Replace(meshYAML, "subset: v2", "subset: v3", 1)
	_, err := s.Apply(ctx, "uid:1", mustDecode(t, bad), false)
	var es config.Errors
	if !errors.As(err, &es) || !strings.Contains(err.Error(), `test.yaml:18: spec.rules[0].destinations[1].subset: service greeter.demo has no subset "v3"`) {
		t.Fatalf("got %v", err)
	}
	if _, rs, _ := s.Load(ctx); len(rs) != 0 {
		t.Fatalf("a refused apply stored %d resources", len(rs))
	}
}

func TestRegistryGrace(t *testing.T) {
	ctx := context.Background()
	clock := clockwork.NewFakeClock()
	s := NewStore(pgtest.NewMigrated(t), clock)
	e := Endpoint{NodeID: "n1", SPIFFEID: "spiffe://example.org/ns/demo/sa/greeter", Service: "greeter", Namespace: "demo", Labels: map[string]string{"version": "v1"}, Address: "10.0.0.1", Ports: []int{50051}}
	if err := s.Register(ctx, "r1", e); err != nil {
		t.Fatal(err)
	}
	other := e
	other.SPIFFEID = "spiffe://example.org/ns/demo/sa/mallory"
	if err := s.Register(ctx, "r1", other); !errors.Is(err, ErrNodeClaimed) {
		t.Fatalf("takeover by another identity: %v", err)
	}
	if err := s.Leave(ctx, "n1", e.SPIFFEID, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	clock.Advance(29 * time.Second)
	if eps, _ := s.Endpoints(ctx); len(eps) != 1 {
		t.Fatalf("inside grace: %d endpoints", len(eps))
	}
	clock.Advance(time.Second)
	if eps, _ := s.Endpoints(ctx); len(eps) != 0 {
		t.Fatalf("after grace: %d endpoints", len(eps))
	}
	if n, err := s.Reap(ctx); err != nil || n != 1 {
		t.Fatalf("reap: %d, %v", n, err)
	}
	// After expiry another identity may take the node id.
	if err := s.Register(ctx, "r1", other); err != nil {
		t.Fatal(err)
	}
	// A replica that stops refreshing (it crashed) loses its
	// registrations after Stale; one that refreshes keeps them.
	clock.Advance(Stale / 2)
	if err := s.Touch(ctx, "r1", []string{"n1"}); err != nil {
		t.Fatal(err)
	}
	clock.Advance(Stale/2 + time.Second)
	if eps, _ := s.Endpoints(ctx); len(eps) != 1 {
		t.Fatalf("refreshed registration: %d endpoints", len(eps))
	}
	clock.Advance(Stale)
	if eps, _ := s.Endpoints(ctx); len(eps) != 0 {
		t.Fatalf("stale registration still live: %d endpoints", len(eps))
	}
	if n, err := s.Reap(ctx); err != nil || n != 1 {
		t.Fatalf("reap stale: %d, %v", n, err)
	}
	// The staleness is configurable (writd's mesh.registry_stale).
	s.SetStale(10 * time.Second)
	if err := s.Register(ctx, "r1", other); err != nil {
		t.Fatal(err)
	}
	clock.Advance(9 * time.Second)
	if eps, _ := s.Endpoints(ctx); len(eps) != 1 {
		t.Fatalf("inside a 10s staleness: %d endpoints", len(eps))
	}
	clock.Advance(2 * time.Second)
	if n, err := s.Reap(ctx); err != nil || n != 1 {
		t.Fatalf("reap after a 10s staleness: %d, %v", n, err)
	}
}

func TestLineDiff(t *testing.T) {
	got := LineDiff("a\nb\nc\n", "a\nx\nc\n")
	want := "  a\n- b\n+ x\n  c\n"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}
