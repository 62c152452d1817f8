package enforcer

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/writmesh/writ/policy"
)

// TestMetricsExposition decides a few requests and reads the metrics back
// through Prometheus's own text format and parser.
func TestMetricsExposition(t *testing.T) {
	ctx := context.Background()
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	eng, err := policy.NewEngine(ctx, policy.Options{Dir: filepath.Join("..", "policies", "rbac"), OnReload: m.ObserveReload})
	if err != nil {
		t.Fatal(err)
	}
	cand, err := policy.NewEngine(ctx, policy.Options{Dir: policyDir(t, "package envoy.authz\n\nallow := true\n")})
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(Options{Engine: eng, Candidate: cand, Sink: &recorder{}, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	e.Check(ctx, simpleRequest(clientID, "GET", "/api/v1/users/1", nil))   // allow
	e.Check(ctx, simpleRequest(clientID, "GET", "/api/v1/users/1", nil))   // allow, cached
	e.Check(ctx, simpleRequest(clientID, "PUT", "/api/v1/users/1", nil))   // deny, candidate disagrees
	e.Check(ctx, simpleRequest(clientID, "GET", "/api/v1/users%2F1", nil)) // bad path

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&text, mf); err != nil {
			t.Fatal(err)
		}
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	parsed, err := parser.TextToMetricFamilies(strings.NewReader(text.String()))
	if err != nil {
		t.Fatalf("parse exposition: %v\n%s", err, text.String())
	}
	value := func(name string, labels map[string]string) float64 {
		t.Helper()
		mf := parsed[name]
		if mf == nil {
			t.Fatalf("no %s in\n%s", name, text.String())
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if labels[lp.GetName()] != lp.GetValue() {
					continue next
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return float64(m.GetHistogram().GetSampleCount())
		}
		return 0
	}
	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"writ_authz_decisions_total", map[string]string{"result": "allow", "cause": "policy"}, 2},
		{"writ_authz_decisions_total", map[string]string{"result": "deny", "cause": "policy"}, 1},
		{"writ_authz_decisions_total", map[string]string{"result": "deny", "cause": "bad_path"}, 1},
		{"writ_authz_decision_duration_seconds", map[string]string{"result": "allow"}, 2},
		{"writ_authz_decisions_cached_total", nil, 1},
		{"writ_authz_dryrun_disagreements_total", nil, 1},
		{"writ_policy_reloads_total", map[string]string{"outcome": "loaded"}, 1},
	} {
		if got := value(tt.name, tt.labels); got != tt.want {
			t.Errorf("%s%v = %v, want %v", tt.name, tt.labels, got, tt.want)
		}
	}
}
