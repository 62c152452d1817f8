package decision

import (
	"fmt"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the API's Prometheus metrics; labels come from small fixed
// sets (api, result, HTTP status), never from request data. A nil
// *metrics counts nothing. Safe for concurrent use.
type metrics struct {
	decisions  *prometheus.CounterVec
	requests   *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	sinkErrors *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	if reg == nil {
		return nil, nil
	}
	m := &metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_decision_api_decisions_total",
			Help: "Answers of the decision API (one per AuthZEN evaluation or data query), by API and result.",
		}, []string{"api", "result"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_decision_api_requests_total",
			Help: "HTTP requests to the decision API, by API and status code.",
		}, []string{"api", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "writ_decision_api_request_duration_seconds",
			Help:    "Time to answer a decision API request, authentication and audit included.",
			Buckets: []float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 500e-3, 2},
		}, []string{"api"}),
		sinkErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "writ_decision_api_audit_errors_total",
			Help: "Answers withheld because the audit sink refused their record.",
		}, []string{"api"}),
	}
	for _, c := range []prometheus.Collector{m.decisions, m.requests, m.latency, m.sinkErrors} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register decision api metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) decision(api, result string) {
	if m != nil {
		m.decisions.WithLabelValues(api, result).Inc()
	}
}

func (m *metrics) sinkError(api string) {
	if m != nil {
		m.sinkErrors.WithLabelValues(api).Inc()
	}
}

func (m *metrics) request(api string, status int, d time.Duration) {
	if m == nil {
		return
	}
	if status == 0 {
		status = 200
	}
	m.requests.WithLabelValues(api, strconv.Itoa(status)).Inc()
	m.latency.WithLabelValues(api).Observe(d.Seconds())
}
