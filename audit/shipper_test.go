package audit

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// bigEvent is an event of about 6 KiB, so that a batch of 50 is over
// keepBatchBuf.
func bigEvent(t testing.TB, i int) *Event {
	ev := testEvent(t, i)
	if err := ev.SetAttributes(map[string]any{"pad": strings.Repeat("x", 6<<10)}); err != nil {
		t.Fatal(err)
	}
	return ev
}

func appendSynced(t *testing.T, s *Spool, from, n int, mk func(testing.TB, int) *Event) {
	t.Helper()
	for i := from; i < from+n; i++ {
		if err := s.Append(context.Background(), mk(t, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
}

// holdingConn is the transport as the shipper's buffer rules assume it:
// it reads the request during the call, and after a failed call it may
// still hold the request's bytes (here: it keeps them and a copy, to
// compare later). It keeps every request slice alive so that the
// identities of their arrays stay distinct.
type holdingConn struct {
	mu      sync.Mutex
	calls   [][]byte // each call's request, as passed
	failAt  int      // the call (0-based) that fails
	held    []byte   // the failed call's request
	snap    []byte   // its content when the call failed
	decoded error
}

func (c *holdingConn) Invoke(_ context.Context, _ string, args, reply any, _ ...grpc.CallOption) error {
	b := args.(*rawBatch).b
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = append(c.calls, b)
	if len(c.calls)-1 == c.failAt {
		c.held, c.snap = b, bytes.Clone(b)
		return errors.New("connection reset while writing")
	}
	evs, err := DecodeBatch(b)
	if err != nil {
		c.decoded = err
		return err
	}
	reply.(*wrapperspb.UInt64Value).Value = evs[len(evs)-1].Seq
	return nil
}

func (c *holdingConn) NewStream(context.Context, *grpc.StreamDesc, string, ...grpc.CallOption) (grpc.ClientStream, error) {
	return nil, errors.New("no streams")
}

func (c *holdingConn) arrays() []*byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*byte, len(c.calls))
	for i, b := range c.calls {
		out[i] = unsafe.SliceData(b)
	}
	return out
}

// TestShipperReusesBatchBufferOnlyAfterSuccess follows the batch buffer
// through Run: a batch larger than keepBatchBuf goes out in the previous
// successful batch's buffer; a failed call's buffer is never written
// again (the transport may still be sending it), so the retry gets a new
// one; and a buffer over keepBatchBuf is let go when the shipper idles.
func TestShipperReusesBatchBufferOnlyAfterSuccess(t *testing.T) {
	// The spool's clock never moves, so its syncer never fsyncs on its
	// own: events become durable (and visible to the shipper) only at
	// the test's Sync, which makes the batches exactly 50 events each.
	s := openTest(t, SpoolOptions{Dir: t.TempDir(), MaxBytes: 64 << 20, Clock: clockwork.NewFakeClock()})
	defer s.Close()
	appendSynced(t, s, 0, 200, bigEvent)
	conn := &holdingConn{failAt: 1}
	clk := clockwork.NewFakeClock()
	sh, err := NewShipper(ShipperOptions{Spool: s, Conn: conn, BatchEvents: 50, Linger: -1,
		MinBackoff: time.Second, MaxBackoff: time.Second, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sh.Run(ctx) }()
	defer func() { cancel(); <-done }()

	// Call 1 succeeds, call 2 fails: the shipper backs off on the clock.
	if err := clk.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Second)
	waitAcked(t, s, 200)
	// Idle: the shipper waits on its poll timer.
	if err := clk.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	appendSynced(t, s, 200, 50, bigEvent)
	waitAcked(t, s, 250)

	conn.mu.Lock()
	if conn.decoded != nil {
		t.Fatalf("a request did not decode: %v", conn.decoded)
	}
	if !bytes.Equal(conn.held, conn.snap) {
		t.Fatal("the failed call's buffer was written after the call returned")
	}
	if n := len(conn.calls); n != 6 {
		t.Fatalf("%d calls, want 6 (4 batches, a failure and its retry, 1 after idling)", n)
	}
	if c := cap(conn.calls[0]); c <= keepBatchBuf {
		t.Fatalf("batch capacity %d, want one over keepBatchBuf (%d) for this test", c, keepBatchBuf)
	}
	conn.mu.Unlock()
	a := conn.arrays()
	for _, c := range []struct {
		i, j int
		same bool
		what string
	}{
		{0, 1, true, "the batch after a success reuses its buffer"},
		{1, 2, false, "the retry after a failure reuses the failed call's buffer"},
		{2, 3, true, "the batch after the retry reuses its buffer"},
		{3, 4, true, "the batch after that reuses its buffer"},
		{4, 5, false, "the batch after idling reuses a buffer over keepBatchBuf"},
	} {
		if (a[c.i] == a[c.j]) != c.same {
			if c.same {
				t.Errorf("calls %d and %d: %s: not so", c.i+1, c.j+1, c.what)
			} else {
				t.Errorf("calls %d and %d: %s", c.i+1, c.j+1, c.what)
			}
		}
	}
}

func waitAcked(t *testing.T, s *Spool, seq uint64) {
	t.Helper()
	for s.Stats().Acked < seq {
		time.Sleep(time.Millisecond)
	}
}

// verifyingCollector checks every batch whole (each event's hash, the
// chain inside the batch) as writd's collector would, and counts what
// it received.
type verifyingCollector struct {
	mu   sync.Mutex
	got  map[uint64]Hash
	errs []error
}

func (c *verifyingCollector) Ship(_ context.Context, req *wrapperspb.BytesValue) (*wrapperspb.UInt64Value, error) {
	evs, err := DecodeBatch(req.GetValue())
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil && len(evs) == 0 {
		err = errors.New("empty batch")
	}
	for i := 1; err == nil && i < len(evs); i++ {
		if evs[i].Seq != evs[i-1].Seq+1 || evs[i].PrevHash != evs[i-1].Hash {
			err = errors.New("batch does not continue its chain")
		}
	}
	if err != nil {
		c.errs = append(c.errs, err)
		return nil, err
	}
	for _, ev := range evs {
		c.got[ev.Seq] = ev.Hash
	}
	return wrapperspb.UInt64(evs[len(evs)-1].Seq), nil
}

// TestShipperBuffersOverRealGRPC ships several batches in flight at once
// over a real gRPC connection, each larger than keepBatchBuf and in a
// reused buffer: if a buffer were rewritten while the transport still
// sent it, the collector would find an event whose hash does not match.
func TestShipperBuffersOverRealGRPC(t *testing.T) {
	s := openTest(t, SpoolOptions{Dir: t.TempDir(), MaxBytes: 64 << 20})
	defer s.Close()
	const n = 1200
	appendSynced(t, s, 0, n, bigEvent)
	col := &verifyingCollector{got: map[uint64]Hash{}}
	srv := grpc.NewServer()
	RegisterCollector(srv, col)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	defer srv.Stop()
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sh, err := NewShipper(ShipperOptions{Spool: s, Conn: conn, BatchEvents: 60, InFlight: 3, Linger: -1})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sh.Run(ctx) }()
	waitAcked(t, s, n)
	cancel()
	<-done
	col.mu.Lock()
	defer col.mu.Unlock()
	if len(col.errs) > 0 {
		t.Fatalf("collector refused %d batches, first: %v", len(col.errs), col.errs[0])
	}
	want := readAll(t, s, 1)
	if len(col.got) != n || len(want) != n {
		t.Fatalf("collector holds %d events, spool %d, want %d", len(col.got), len(want), n)
	}
	for _, ev := range want {
		if col.got[ev.Seq] != ev.Hash {
			t.Fatalf("seq %d: collector's hash differs from the spool's", ev.Seq)
		}
	}
}
