package enforcer

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/writmesh/writ/policy"
)

// Metrics are the enforcer's Prometheus metrics. Labels come from small
// fixed sets (result, cause, outcome), never from request data. Safe for
// concurrent use.
type Metrics struct {
	decisions     *prometheus.CounterVec
	latency       *prometheus.HistogramVec
	cached        prometheus.Counter
	disagreements prometheus.Counter
	reloads       *prometheus.CounterVec
}

// NewMetrics registers the metrics with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_authz_decisions_total",
			Help: "Authorization decisions by result and cause.",
		}, []string{"result", "cause"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "writ_authz_decision_duration_seconds",
			Help:    "Time to decide a request, from its arrival to the audit record.",
			Buckets: []float64{5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 5e-3, 25e-3, 100e-3},
		}, []string{"result"}),
		cached: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "writ_authz_decisions_cached_total",
			Help: "Decisions answered from the policy decision cache.",
		}),
		disagreements: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "writ_authz_dryrun_disagreements_total",
			Help: "Decisions where the dry-run candidate policy disagreed with the enforced one.",
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_policy_reloads_total",
			Help: "Policy reload attempts that saw new content, by outcome.",
		}, []string{"outcome"}),
	}
	for _, c := range []prometheus.Collector{m.decisions, m.latency, m.cached, m.disagreements, m.reloads} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register enforcer metrics: %w", err)
		}
	}
	return m, nil
}

func (m *Metrics) observe(d Decision) {
	if m == nil {
		return
	}
	m.decisions.WithLabelValues(d.Result, d.Cause).Inc()
	m.latency.WithLabelValues(d.Result).Observe(d.Latency.Seconds())
	if d.Cached {
		m.cached.Inc()
	}
	if d.DryRun != nil && d.DryRun.Disagrees {
		m.disagreements.Inc()
	}
}

// ObserveReload counts a policy reload; pass it as policy.Options.OnReload
// (or call it from there).
func (m *Metrics) ObserveReload(ev policy.ReloadEvent) {
	if m == nil {
		return
	}
	if ev.Err != nil {
		m.reloads.WithLabelValues("rejected").Inc()
		return
	}
	m.reloads.WithLabelValues("loaded").Inc()
}
