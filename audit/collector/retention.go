package collector

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
)

// Retainer is the retention job: every Interval it drops the daily
// partitions older than Keep (Retain). Pool should connect as the
// retention role, which owns the partitions; the collector's role should
// not be able to drop anything. Several replicas may run it: drops are
// serialized by the partition lock and a partition already gone is
// skipped. It is used by one goroutine (Run).
type Retainer struct {
	Pool     *pgxpool.Pool
	Keep     time.Duration
	Minimum  time.Duration // default DefaultMinRetention
	Interval time.Duration // default 1h
	Clock    clockwork.Clock
	Logger   *slog.Logger

	runs    *prometheus.CounterVec
	dropped prometheus.Counter
}

// NewRetainer checks r's settings (a Keep under Minimum is refused here,
// before anything runs) and registers its metrics on reg (may be nil).
func NewRetainer(r Retainer, reg prometheus.Registerer) (*Retainer, error) {
	if r.Pool == nil {
		return nil, errors.New("audit retention: no database pool")
	}
	if r.Minimum <= 0 {
		r.Minimum = DefaultMinRetention
	}
	if r.Keep < r.Minimum {
		return nil, errors.Join(ErrRetentionTooShort, errors.New("audit retention: keep "+r.Keep.String()+" < minimum "+r.Minimum.String()))
	}
	if r.Interval <= 0 {
		r.Interval = time.Hour
	}
	if r.Clock == nil {
		r.Clock = clockwork.NewRealClock()
	}
	if r.Logger == nil {
		r.Logger = slog.New(slog.DiscardHandler)
	}
	r.runs = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "writ_audit_retention_runs_total", Help: "Runs of the audit retention job by outcome."}, []string{"outcome"})
	r.dropped = prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_audit_retention_partitions_dropped_total", Help: "Daily audit partitions dropped by the retention job."})
	if reg != nil {
		if err := reg.Register(r.runs); err != nil {
			return nil, err
		}
		if err := reg.Register(r.dropped); err != nil {
			return nil, err
		}
	}
	return &r, nil
}

// RunOnce drops what is due now and returns the partitions dropped.
func (r *Retainer) RunOnce(ctx context.Context) ([]string, error) {
	now := r.Clock.Now()
	dropped, err := Retain(ctx, r.Pool, now, r.Keep, r.Minimum)
	r.dropped.Add(float64(len(dropped)))
	if err != nil {
		r.Logger.Error("audit retention failed", "keep", r.Keep, "dropped", dropped, "err", err)
		r.runs.WithLabelValues("error").Inc()
		return dropped, err
	}
	if len(dropped) > 0 {
		r.Logger.Info("audit retention dropped partitions", "keep", r.Keep, "cutoff", now.UTC().Add(-r.Keep), "partitions", dropped)
	} else {
		r.Logger.Debug("audit retention: nothing to drop", "keep", r.Keep)
	}
	// Counted last: a run counted is a run finished, log included.
	r.runs.WithLabelValues("ok").Inc()
	return dropped, nil
}

// Run runs the job at once and then every Interval until ctx ends. A
// failed run is logged and counted; the next one tries again.
func (r *Retainer) Run(ctx context.Context) error {
	for {
		_, _ = r.RunOnce(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-r.Clock.After(r.Interval):
		}
	}
}
