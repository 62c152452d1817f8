package collector_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/svidtls"
)

type rig struct {
	env  *authoritytest.Env
	col  *collector.Collector
	addr string
}

func startRig(t *testing.T) *rig { return startRigB(t) }

func startRigB(t testing.TB) *rig {
	t.Helper()
	env := authoritytest.Start(t, authoritytest.Options{})
	col, err := collector.New(collector.Options{Pool: env.Pool})
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(authority.GRPCServerOptions(env.Identity.TLSConfig())...)
	audit.RegisterCollector(srv, col)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	return &rig{env: env, col: col, addr: l.Addr().String()}
}

// dial connects to the collector presenting svid.
func (r *rig) dial(t *testing.T, svid *x509svid.SVID) *grpc.ClientConn { return r.dialB(t, svid) }

func (r *rig) dialB(t testing.TB, svid *x509svid.SVID) *grpc.ClientConn {
	t.Helper()
	var src x509svid.Source
	if svid != nil {
		src = svid
	}
	cfg := svidtls.ClientConfig(src, r.env.Bundle(t), svidtls.AuthorizeID(authority.ControlPlaneID(authoritytest.TrustDomain)), r.env.Clock)
	conn, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func appendN(t *testing.T, s *audit.Spool, n int) {
	t.Helper()
	for i := range n {
		ev, err := audit.NewEvent(audit.KindRequest, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		ev.Principal, ev.Destination, ev.Action, ev.Result = "spiffe://example.org/ns/a/sa/x", "spiffe://example.org/ns/b/sa/y", "GET", "allow"
		ev.Resource = "/r/" + string(rune('a'+i%26))
		ev.Attributes = []byte(`{"n":1.5,"h":{"user-agent":"<x>"}}`)
		if err := s.Append(context.Background(), &ev); err != nil {
			t.Fatal(err)
		}
	}
	// Readers see only fsynced records; fsync-grouped syncs later.
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
}

func count(t *testing.T, r *rig, source string) int {
	t.Helper()
	var n int
	if err := r.env.Pool.QueryRow(context.Background(), "SELECT count(*) FROM audit_events WHERE source = $1", source).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitFor polls cond (real time: the shipper runs on a real clock) up to
// a generous limit; the limit is a hang guard, not a timing assertion.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestShipperToCollectorOverMTLS(t *testing.T) {
	r := startRig(t)
	svid := r.env.Attest(t, "node1")
	src := svid.ID.String()
	s, err := audit.OpenSpool(audit.SpoolOptions{Dir: t.TempDir(), Source: src, SegmentBytes: 32 << 10, Durability: audit.DurabilityGrouped})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	appendN(t, s, 1500)
	sh, err := audit.NewShipper(audit.ShipperOptions{Spool: s, Conn: r.dial(t, svid), BatchEvents: 400})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sh.Run(ctx) }()
	waitFor(t, "1500 events", func() bool { return s.Stats().Acked == 1500 })
	cancel()
	<-done
	if got := count(t, r, src); got != 1500 {
		t.Fatalf("rows = %d, want 1500", got)
	}
	if st := s.Stats(); st.Segments != 1 {
		t.Fatalf("acknowledged segments kept: %+v", st)
	}
	res, err := collector.Verify(context.Background(), r.env.Pool, collector.VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !res.OK() || res.Events != 1500 || res.Sources != 1 {
		t.Fatalf("verify: %+v", res)
	}
}

// shipCounter is the collector behind a server of its own that records
// the size of each batch it receives.
type shipCounter struct {
	col   *collector.Collector
	mu    sync.Mutex
	sizes []int
}

func (c *shipCounter) Ship(ctx context.Context, req *wrapperspb.BytesValue) (*wrapperspb.UInt64Value, error) {
	evs, err := audit.DecodeBatch(req.GetValue())
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.sizes = append(c.sizes, len(evs))
	c.mu.Unlock()
	return c.col.Ship(ctx, req)
}

func (c *shipCounter) batches() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]int(nil), c.sizes...)
}

// counted serves a shipCounter over r's collector and returns it and a
// rig whose dial reaches it.
func (r *rig) counted(t *testing.T) (*shipCounter, *rig) {
	c := &shipCounter{col: r.col}
	srv := grpc.NewServer(authority.GRPCServerOptions(r.env.Identity.TLSConfig())...)
	audit.RegisterCollector(srv, c)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	return c, &rig{env: r.env, col: r.col, addr: l.Addr().String()}
}

// The shipper sends the first event after a quiet spell at once, lets a
// partial batch wait until Linger has passed since the previous send
// (one larger call instead of one per fsync), and never holds back a
// full batch.
func TestShipperLingersOnlyOnPartialBatches(t *testing.T) {
	r := startRig(t)
	svid := r.env.Attest(t, "node1")
	src := svid.ID.String()
	// The spool's syncer fsyncs once and then waits on a clock that never
	// moves: only the test's Sync calls make events durable, so what the
	// shipper can read at each step is fixed.
	s, err := audit.OpenSpool(audit.SpoolOptions{Dir: t.TempDir(), Source: src, Durability: audit.DurabilityGrouped,
		SyncInterval: time.Hour, Clock: clockwork.NewFakeClock()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	counter, cr := r.counted(t)
	clock := clockwork.NewFakeClock()
	const poll, linger = 10 * time.Millisecond, 100 * time.Millisecond
	sh, err := audit.NewShipper(audit.ShipperOptions{Spool: s, Conn: cr.dial(t, svid), BatchEvents: 10, Linger: linger, Poll: poll, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, s, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sh.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "the first event, sent at once", func() bool { return s.Stats().Acked == 1 })

	// Nine more events, durable. The shipper waits on one timer at a
	// time (its poll while idle, then the linger): stepping the clock a
	// poll at a time up to just before Linger, it has woken and read the
	// events, and must still hold them.
	appendN(t, s, 9)
	bctx, bcancel := context.WithTimeout(ctx, time.Minute)
	defer bcancel()
	step := func() {
		t.Helper()
		if err := clock.BlockUntilContext(bctx, 1); err != nil {
			t.Fatalf("shipper waits on no timer: %v (batches %v)", err, counter.batches())
		}
	}
	for elapsed := time.Duration(0); elapsed < linger-poll; elapsed += poll {
		step()
		clock.Advance(poll)
	}
	step()
	if st := s.Stats(); st.Acked != 1 {
		t.Fatalf("a partial batch was sent before Linger passed: %+v, batches %v", st, counter.batches())
	}
	clock.Advance(poll)
	waitFor(t, "the lingering batch", func() bool { return s.Stats().Acked == 10 })

	// A full batch goes without the clock moving.
	appendN(t, s, 10)
	waitFor(t, "a full batch", func() bool { return s.Stats().Acked == 20 })

	// After a quiet spell of Linger, the next event goes at once.
	clock.Advance(linger)
	appendN(t, s, 1)
	waitFor(t, "an event after a quiet spell", func() bool { return s.Stats().Acked == 21 })

	if got, want := fmt.Sprint(counter.batches()), "[1 9 10 1]"; got != want {
		t.Fatalf("batches %s, want %s", got, want)
	}
	if got := count(t, r, src); got != 21 {
		t.Fatalf("rows = %d, want 21", got)
	}
}

// TestShipperAfterCrashWithLaggingAckFile: the spool rewrites its acked
// file at most once a second, so a crash leaves it behind the events
// already acknowledged. The spool's files as a crash leaves them (copied
// while it is open, without Close) reopen at the older seq; the shipper
// sends the acknowledged events again with new ones, and the trail holds
// each once, its chain intact.
func TestShipperAfterCrashWithLaggingAckFile(t *testing.T) {
	r := startRig(t)
	svid := r.env.Attest(t, "node1")
	src := svid.ID.String()
	conn := r.dial(t, svid)
	// A clock that never moves: the acked file is written on the first
	// acknowledgement only. Appends are made durable by appendN's Sync.
	opts := audit.SpoolOptions{Source: src, Durability: audit.DurabilityGrouped, SyncInterval: time.Hour, Clock: clockwork.NewFakeClock()}
	ship := func(s *audit.Spool, want uint64) {
		t.Helper()
		sh, err := audit.NewShipper(audit.ShipperOptions{Spool: s, Conn: conn, Linger: -1})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- sh.Run(ctx) }()
		waitFor(t, fmt.Sprintf("events up to %d acknowledged", want), func() bool { return s.Stats().Acked == want })
		cancel()
		<-done
	}
	dir := t.TempDir()
	opts.Dir = dir
	s, err := audit.OpenSpool(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	appendN(t, s, 1)
	ship(s, 1)
	appendN(t, s, 9)
	ship(s, 10)

	crashed := t.TempDir()
	if err := os.CopyFS(crashed, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	opts.Dir = crashed
	s2, err := audit.OpenSpool(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got := s2.Stats().Acked; got != 1 {
		t.Fatalf("after the crash the spool resumes after %d, want 1 (the acked file's lag)", got)
	}
	appendN(t, s2, 5)
	ship(s2, 15)
	if got := count(t, r, src); got != 15 {
		t.Fatalf("rows = %d, want 15", got)
	}
	res, err := collector.Verify(context.Background(), r.env.Pool, collector.VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !res.OK() || res.Events != 15 {
		t.Fatalf("verify: %+v", res)
	}
}

func TestCollectorIsIdempotent(t *testing.T) {
	r := startRig(t)
	svid := r.env.Attest(t, "node1")
	s, _ := audit.OpenSpool(audit.SpoolOptions{Dir: t.TempDir(), Source: svid.ID.String()})
	defer s.Close()
	appendN(t, s, 50)
	var rd audit.Reader
	defer rd.Close()
	raws, err := s.ReadBatch(&rd, 1, 100, 1<<20)
	if err != nil || len(raws) != 50 {
		t.Fatalf("read %d: %v", len(raws), err)
	}
	conn := r.dial(t, svid)
	for range 3 {
		out := new(wrapperspb.UInt64Value)
		if err := conn.Invoke(context.Background(), "/writ.audit.v1.Collector/Ship", wrapperspb.Bytes(audit.EncodeBatch(raws)), out); err != nil {
			t.Fatal(err)
		}
		if out.GetValue() != 50 {
			t.Fatalf("ack %d, want 50", out.GetValue())
		}
	}
	// An overlapping batch too.
	out := new(wrapperspb.UInt64Value)
	if err := conn.Invoke(context.Background(), "/writ.audit.v1.Collector/Ship", wrapperspb.Bytes(audit.EncodeBatch(raws[20:])), out); err != nil {
		t.Fatal(err)
	}
	if got := count(t, r, svid.ID.String()); got != 50 {
		t.Fatalf("rows = %d after re-sends, want 50", got)
	}
}

func TestCollectorRefusesAnotherSourcesEvents(t *testing.T) {
	r := startRig(t)
	svid := r.env.Attest(t, "node1")
	s, _ := audit.OpenSpool(audit.SpoolOptions{Dir: t.TempDir(), Source: "spiffe://example.org/ns/pay/sa/payments"})
	defer s.Close()
	appendN(t, s, 3)
	var rd audit.Reader
	defer rd.Close()
	raws, _ := s.ReadBatch(&rd, 1, 100, 1<<20)
	err := r.dial(t, svid).Invoke(context.Background(), "/writ.audit.v1.Collector/Ship", wrapperspb.Bytes(audit.EncodeBatch(raws)), new(wrapperspb.UInt64Value))
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("got %v, want PermissionDenied", err)
	}
	// Without a client certificate: unauthenticated.
	err = r.dial(t, nil).Invoke(context.Background(), "/writ.audit.v1.Collector/Ship", wrapperspb.Bytes(audit.EncodeBatch(raws)), new(wrapperspb.UInt64Value))
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("got %v, want Unauthenticated", err)
	}
	// A source that merely starts with the caller's ID is another
	// identity; ID#instance is the caller's own chain.
	for _, tc := range []struct {
		source string
		want   codes.Code
	}{
		{svid.ID.String() + "0", codes.PermissionDenied},
		{svid.ID.String() + "/x#i", codes.PermissionDenied},
		{svid.ID.String() + "#", codes.PermissionDenied},
		{svid.ID.String() + "#a b", codes.PermissionDenied},
		{svid.ID.String() + "#a#b", codes.PermissionDenied},
		{svid.ID.String() + "#0123456789abcdef", codes.OK},
	} {
		s, _ := audit.OpenSpool(audit.SpoolOptions{Dir: t.TempDir(), Source: tc.source})
		appendN(t, s, 2)
		var rd audit.Reader
		raws, _ := s.ReadBatch(&rd, 1, 100, 1<<20)
		rd.Close()
		s.Close()
		err := r.dial(t, svid).Invoke(context.Background(), "/writ.audit.v1.Collector/Ship", wrapperspb.Bytes(audit.EncodeBatch(raws)), new(wrapperspb.UInt64Value))
		if status.Code(err) != tc.want {
			t.Fatalf("source %s: got %v, want %v", tc.source, err, tc.want)
		}
	}
	var n int
	_ = r.env.Pool.QueryRow(context.Background(), "SELECT count(*) FROM audit_events").Scan(&n)
	if n != 2 {
		t.Fatalf("%d rows written, want the 2 of the caller's own instance", n)
	}
}

func TestAuditEventsAreAppendOnly(t *testing.T) {
	r := startRig(t)
	svid := r.env.Attest(t, "node1")
	s, _ := audit.OpenSpool(audit.SpoolOptions{Dir: t.TempDir(), Source: svid.ID.String()})
	defer s.Close()
	appendN(t, s, 2)
	var rd audit.Reader
	defer rd.Close()
	raws, _ := s.ReadBatch(&rd, 1, 100, 1<<20)
	evs, err := audit.DecodeBatch(audit.EncodeBatch(raws))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.col.Insert(context.Background(), evs); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"UPDATE audit_events SET result = 'deny'", "DELETE FROM audit_events"} {
		_, err := r.env.Pool.Exec(context.Background(), q)
		if err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Errorf("%s: got %v, want refusal", q, err)
		}
	}
}

func TestRetention(t *testing.T) {
	r := startRig(t)
	ctx := context.Background()
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	for _, d := range []time.Time{now.AddDate(0, 0, -200), now.AddDate(0, 0, -100), now.AddDate(0, 0, -10), now} {
		if err := r.col.EnsurePartition(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := collector.Retain(ctx, r.env.Pool, now, 24*time.Hour, 0); !errors.Is(err, collector.ErrRetentionTooShort) {
		t.Fatalf("1 day retention: got %v, want ErrRetentionTooShort", err)
	}
	dropped, err := collector.Retain(ctx, r.env.Pool, now, 95*24*time.Hour, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(dropped) != 2 || dropped[0] != "audit_events_p20260506" {
		t.Fatalf("dropped %v, want the -200 and -100 day partitions", dropped)
	}
}

func TestPartitionsAhead(t *testing.T) {
	r := startRig(t)
	clock := clockwork.NewFakeClockAt(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	col, _ := collector.New(collector.Options{Pool: r.env.Pool, Clock: clock, PartitionsAhead: 2, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- col.Run(ctx) }()
	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	cancel()
	<-done
	var n int
	_ = r.env.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_class WHERE relname IN ('audit_events_p20300101','audit_events_p20300102','audit_events_p20300103')`).Scan(&n)
	if n != 3 {
		t.Fatalf("%d of 3 partitions ahead exist", n)
	}
}

// TestReplicasCollectConcurrently has two collectors (two writd replicas)
// insert overlapping batches at the same time: every event is stored once.
func TestReplicasCollectConcurrently(t *testing.T) {
	r := startRig(t)
	other, err := collector.New(collector.Options{Pool: r.env.Pool})
	if err != nil {
		t.Fatal(err)
	}
	s, _ := audit.OpenSpool(audit.SpoolOptions{Dir: t.TempDir(), Source: "spiffe://example.org/node/n", Durability: audit.DurabilityGrouped})
	defer s.Close()
	appendN(t, s, 3000)
	_ = s.Sync()
	var rd audit.Reader
	defer rd.Close()
	raws, _ := s.ReadBatch(&rd, 1, 3000, 1<<24)
	evs, err := audit.DecodeBatch(audit.EncodeBatch(raws))
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 6)
	for i, c := range []*collector.Collector{r.col, other, r.col, other, r.col, other} {
		go func() { errs <- c.Insert(context.Background(), evs[i*300:min(len(evs), i*300+1500)]) }()
	}
	for range 6 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	var n, distinct int
	_ = r.env.Pool.QueryRow(context.Background(), "SELECT count(*), count(DISTINCT id) FROM audit_events").Scan(&n, &distinct)
	if n != 3000 || distinct != 3000 {
		t.Fatalf("%d rows, %d distinct; want 3000", n, distinct)
	}
}

// TestRecordChainsAcrossReplicas records writd-side events from two
// collectors (two replicas) under one source concurrently, and one inside a
// transaction that rolls back: the chain is gapless and holds exactly the
// committed events.
func TestRecordChainsAcrossReplicas(t *testing.T) {
	r := startRig(t)
	other, _ := collector.New(collector.Options{Pool: r.env.Pool})
	ctx := context.Background()
	const src = "spiffe://example.org/writ/control-plane/replica/r1"
	errs := make(chan error, 40)
	for i := range 40 {
		c := r.col
		if i%2 == 1 {
			c = other
		}
		go func() {
			ev, err := audit.NewEvent(audit.KindConfigChange, time.Now())
			if err != nil {
				errs <- err
				return
			}
			ev.Principal, ev.Action, ev.Resource, ev.Result = "uid:0", "apply", "mesh/payments", "ok"
			if err := ev.SetAttributes(map[string]any{"diff": "+ allow GET /x", "n": i}); err != nil {
				errs <- err
				return
			}
			errs <- c.Record(ctx, src, &ev)
		}()
	}
	for range 40 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	tx, err := r.env.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ev, _ := audit.NewEvent(audit.KindLogin, time.Now())
	if err := r.col.RecordTx(ctx, tx, src, &ev); err != nil {
		t.Fatal(err)
	}
	_ = tx.Rollback(ctx)
	// A batch with an invalid event records none of its events.
	good, _ := audit.NewEvent(audit.KindDecisionAPI, time.Now())
	bad, _ := audit.NewEvent("no-such-kind", time.Now())
	if err := r.col.RecordBatch(ctx, src, []*audit.Event{&good, &bad}); err == nil {
		t.Fatal("a batch with an invalid event was recorded")
	}
	evs, err := collector.Events(ctx, r.env.Pool, src)
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 40 || evs[39].Seq != 40 {
		t.Fatalf("%d events, last seq %d; want 40", len(evs), evs[len(evs)-1].Seq)
	}
	res, err := collector.Verify(ctx, r.env.Pool, collector.VerifyOptions{})
	if err != nil || !res.OK() {
		t.Fatalf("verify: %+v %v", res, err)
	}
}
