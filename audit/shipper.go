package audit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
)

// ShipperOptions configure a Shipper.
type ShipperOptions struct {
	Spool *Spool
	// Conn reaches writd's collector. Its transport must present the
	// recorder's SVID (the collector checks that every event's source is
	// the caller): build it with authority/svidtls.ClientConfig.
	Conn        grpc.ClientConnInterface
	BatchEvents int // default 5000
	BatchBytes  int // default 2 MiB
	// InFlight is how many batches may await acknowledgement at once
	// (default 1, at most 16; more did not help on a loaded 2-core
	// machine).
	InFlight    int
	CallTimeout time.Duration // default 15s
	// Linger is how long after a send began the next batch that is not
	// full waits for more events (default 100ms; negative: never). The
	// first event after a quiet spell goes at once; under a steady load
	// the shipper then makes at most about one call per Linger instead of
	// one per fsync (every 10 ms), each a larger COPY in one transaction
	// for writd and PostgreSQL, which share the cores of the proxies they
	// serve. A full batch never waits.
	Linger     time.Duration
	MinBackoff time.Duration // default 100ms
	MaxBackoff time.Duration // default 10s
	// Poll is how often an idle shipper looks for new events when no
	// fsync has signalled any (default 1s).
	Poll   time.Duration
	Clock  clockwork.Clock
	Logger *slog.Logger
}

// Shipper streams a spool to the collector: batches of durable events,
// sent in order, each acknowledged only after the collector committed it,
// after which the spool may delete them. After any failure it backs off
// and resends from the first unacknowledged event; the collector ignores
// what it already has. It is used by one goroutine (Run).
type Shipper struct {
	o ShipperOptions
}

// NewShipper checks o and returns a Shipper.
func NewShipper(o ShipperOptions) (*Shipper, error) {
	if o.Spool == nil || o.Conn == nil {
		return nil, errors.New("audit shipper: spool and conn are required")
	}
	if o.BatchEvents <= 0 {
		o.BatchEvents = 5000
	}
	if o.BatchBytes <= 0 {
		o.BatchBytes = 2 << 20
	}
	o.BatchBytes = min(o.BatchBytes, MaxBatchBytes-MaxRecordBytes)
	o.BatchEvents = min(o.BatchEvents, MaxBatchEvents)
	if o.InFlight <= 0 {
		o.InFlight = 1
	}
	o.InFlight = min(o.InFlight, maxInFlight)
	if o.CallTimeout <= 0 {
		o.CallTimeout = 15 * time.Second
	}
	if o.Linger == 0 {
		o.Linger = 100 * time.Millisecond
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 100 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 10 * time.Second
	}
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	if o.Clock == nil {
		o.Clock = clockwork.NewRealClock()
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Shipper{o: o}, nil
}

// Run ships until ctx ends. It returns nil on cancellation; failures of
// the collector or the network are retried, not returned.
func (s *Shipper) Run(ctx context.Context) error {
	var r Reader
	defer r.Close()
	failures := 0
	var lastSend time.Time
	// bufs[i] is kept for the i-th batch in flight: one encoded batch,
	// reused from one send to the next whatever its size while the
	// shipper is busy (at saturation a batch is several hundred KiB, and
	// a fresh one each time cost the proxy a few percent of its CPU in
	// clearing and faulting in new pages), and let go when it goes idle.
	bufs := make([][]byte, s.o.InFlight)
	for ctx.Err() == nil {
		next := s.o.Spool.Stats().Acked + 1
		// Up to InFlight batches go out at once, so that reading and
		// sending overlap the collector's commits; acknowledgements are
		// applied in order, up to the first failure.
		var batches []outBatch
		var err error
		from := next
		for len(batches) < s.o.InFlight {
			b := outBatch{first: from, enc: bufs[len(batches)][:0]}
			if b.enc, b.n, err = s.o.Spool.ReadFramed(&r, from, s.o.BatchEvents, s.o.BatchBytes, b.enc); err != nil || b.n == 0 {
				break
			}
			full := s.full(b)
			if !full && len(batches) == 0 {
				if wait := s.o.Linger - s.o.Clock.Since(lastSend); wait > 0 {
					if !s.sleep(ctx, wait) {
						return nil
					}
					// The reader is positioned after b: the top-up
					// reads only what became durable meanwhile.
					var more int
					b.enc, more, err = s.o.Spool.ReadFramed(&r, from+uint64(b.n), s.o.BatchEvents-b.n, s.o.BatchBytes-b.payloadBytes(), b.enc)
					b.n += more
					full = s.full(b)
				}
			}
			batches = append(batches, b)
			from += uint64(b.n)
			if !full || err != nil {
				break // nothing more is durable yet
			}
		}
		if err == nil && len(batches) == 0 {
			// Idle: a backlog's or a burst's buffers are not worth
			// keeping through a quiet spell; a steady small load's are.
			for i, b := range bufs {
				if cap(b) > keepBatchBuf {
					bufs[i] = nil
				}
			}
			// A stopped timer, not Clock.After: an idle shipper woken by
			// each fsync would otherwise leave one pending timer per wake.
			t := s.o.Clock.NewTimer(s.o.Poll)
			select {
			case <-ctx.Done():
			case <-s.o.Spool.Durable():
			case <-t.Chan():
			}
			t.Stop()
			continue
		}
		if len(batches) > 0 {
			lastSend = s.o.Clock.Now()
			var lasts [maxInFlight]uint64
			var errs [maxInFlight]error
			if len(batches) == 1 {
				lasts[0], errs[0] = s.send(ctx, batches[0])
			} else {
				var wg sync.WaitGroup
				for i := range batches {
					wg.Add(1)
					go func() {
						defer wg.Done()
						lasts[i], errs[i] = s.send(ctx, batches[i])
					}()
				}
				wg.Wait()
			}
			for i, b := range batches {
				// Reusing a buffer is safe only once gRPC is done with
				// it. After a successful unary call it is: the codec
				// hands the slice itself to the transport (shipCodec),
				// whose writer copies it into its own buffer or the
				// connection before the bytes leave, and the collector
				// answers only after reading the whole request, so by
				// then every copy is made; the call's retry buffer is
				// released when it returns, and SliceBuffer is never
				// pooled. After a failed call the transport may still
				// be writing it: it is dropped, not reused.
				if errs[i] == nil && cap(b.enc) <= maxKeptBatchBuf {
					bufs[i] = b.enc[:0]
				} else {
					bufs[i] = nil
				}
			}
			for i := range batches {
				if errs[i] != nil {
					err = errs[i]
					break
				}
				if aerr := s.o.Spool.Ack(lasts[i]); aerr != nil {
					err = aerr
					break
				}
			}
		}
		if err != nil {
			r.Close()
			failures++
			d := s.backoff(failures)
			s.o.Logger.Warn("audit shipper: batch not acknowledged; retrying", "from_seq", next, "attempt", failures, "retry_in", d, "err", err)
			s.sleep(ctx, d)
			continue
		}
		failures = 0
	}
	return nil
}

// keepBatchBuf bounds the encoded batch a shipper keeps while idle (per
// batch in flight): a steady light load's batches (about 100 events of
// ~700 bytes at 1,000 requests/s with the default Linger) keep theirs
// through the pauses between them. While busy it keeps any batch's
// buffer up to maxKeptBatchBuf, which a batch bounded by BatchBytes
// (at most MaxBatchBytes-MaxRecordBytes) with its framing stays under.
const (
	keepBatchBuf    = 256 << 10
	maxKeptBatchBuf = MaxBatchBytes + MaxRecordBytes
)

// maxInFlight bounds InFlight.
const maxInFlight = 16

// outBatch is one encoded batch (EncodeBatch's form) of n events from
// seq first on.
type outBatch struct {
	first uint64
	n     int
	enc   []byte
}

// payloadBytes is the size of the events without their framing, as
// ReadFramed's maxBytes counts it.
func (b outBatch) payloadBytes() int { return len(b.enc) - 4*b.n }

// send ships one batch and returns the acknowledged seq.
func (s *Shipper) send(ctx context.Context, b outBatch) (uint64, error) {
	cctx, cancel := context.WithTimeout(ctx, s.o.CallTimeout)
	defer cancel()
	last, err := ship(cctx, s.o.Conn, b.enc)
	if err != nil {
		return 0, fmt.Errorf("ship: %w", err)
	}
	if want := b.first + uint64(b.n) - 1; last != want {
		return 0, fmt.Errorf("collector acknowledged seq %d, want %d", last, want)
	}
	return last, nil
}

// sleep waits d unless ctx ends first, and tells whether d passed.
func (s *Shipper) sleep(ctx context.Context, d time.Duration) bool {
	t := s.o.Clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.Chan():
		return true
	}
}

// full tells whether b is as large as a batch may be, so that waiting for
// more events would gain nothing.
func (s *Shipper) full(b outBatch) bool {
	return b.n >= s.o.BatchEvents || b.payloadBytes() >= s.o.BatchBytes
}

// backoff doubles from MinBackoff to MaxBackoff with full jitter in the
// upper half, so that many shippers do not retry in step.
func (s *Shipper) backoff(failures int) time.Duration {
	d := s.o.MinBackoff << min(failures-1, 20)
	if d > s.o.MaxBackoff || d <= 0 {
		d = s.o.MaxBackoff
	}
	return d/2 + rand.N(d/2+1)
}
