package audit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
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
	BatchEvents int           // default 5000
	BatchBytes  int           // default 2 MiB
	CallTimeout time.Duration // default 15s
	MinBackoff  time.Duration // default 100ms
	MaxBackoff  time.Duration // default 10s
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
	if o.CallTimeout <= 0 {
		o.CallTimeout = 15 * time.Second
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
	for ctx.Err() == nil {
		next := s.o.Spool.Stats().Acked + 1
		batch, err := s.o.Spool.ReadBatch(&r, next, s.o.BatchEvents, s.o.BatchBytes)
		if err == nil && len(batch) == 0 {
			select {
			case <-ctx.Done():
			case <-s.o.Spool.Durable():
			case <-s.o.Clock.After(s.o.Poll):
			}
			continue
		}
		if err == nil {
			err = s.send(ctx, batch, next)
		}
		if err != nil {
			r.Close()
			failures++
			d := s.backoff(failures)
			s.o.Logger.Warn("audit shipper: batch not acknowledged; retrying", "from_seq", next, "events", len(batch), "attempt", failures, "retry_in", d, "err", err)
			select {
			case <-ctx.Done():
			case <-s.o.Clock.After(d):
			}
			continue
		}
		failures = 0
	}
	return nil
}

func (s *Shipper) send(ctx context.Context, batch [][]byte, first uint64) error {
	cctx, cancel := context.WithTimeout(ctx, s.o.CallTimeout)
	defer cancel()
	last, err := ship(cctx, s.o.Conn, EncodeBatch(batch))
	if err != nil {
		return fmt.Errorf("ship: %w", err)
	}
	if want := first + uint64(len(batch)) - 1; last != want {
		return fmt.Errorf("collector acknowledged seq %d, want %d", last, want)
	}
	return s.o.Spool.Ack(last)
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
