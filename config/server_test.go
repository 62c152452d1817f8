package config

import (
	"strings"
	"testing"
	"time"
)

func noenv(string) string { return "" }

func TestParseServerDefaults(t *testing.T) {
	s, err := ParseServer("writ.yaml", []byte("trust_domain: example.org\ndatabase_url: postgres://localhost/writ\n"), noenv)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := s.CA.X509SVIDTTL.D(), time.Hour; got != want {
		t.Errorf("x509 ttl = %v, want %v", got, want)
	}
	if got, want := s.CA.JWTSVIDTTL.D(), 5*time.Minute; got != want {
		t.Errorf("jwt ttl = %v, want %v", got, want)
	}
	if got, want := s.Listen.HTTP, DefaultHTTPAddr; got != want {
		t.Errorf("listen.http = %q, want %q", got, want)
	}
	if s.Policy != nil {
		t.Errorf("policy = %+v, want nil when not configured", s.Policy)
	}
	if m := s.Mesh; m.RegistryGrace.D() != 30*time.Second || m.RegistryStale.D() != 90*time.Second || m.Resync.D() != time.Minute {
		t.Errorf("mesh defaults %+v, want grace 30s, stale 90s, resync 1m", m)
	}
	s, err = ParseServer("writ.yaml", []byte("trust_domain: example.org\ndatabase_url: postgres://localhost/writ\npolicy:\n  dir: /etc/writ/policies\n  plain_http: true\n"), noenv)
	if err != nil {
		t.Fatal(err)
	}
	if s.Policy.BundleName != "mesh" || s.Policy.PollInterval.D() != 2*time.Second {
		t.Errorf("policy defaults %+v, want bundle_name mesh and poll_interval 2s", s.Policy)
	}
}

func TestParseServerDecisionDefaults(t *testing.T) {
	s, err := ParseServer("writ.yaml", []byte("trust_domain: example.org\ndatabase_url: postgres://localhost/writ\nlisten:\n  decision: 127.0.0.1:8443\ndecision:\n  policy_dir: /etc/writ/policies\n  admin_policy_dir: /etc/writ/policies/admin\n"), noenv)
	if err != nil {
		t.Fatal(err)
	}
	d := s.Decision
	if got, want := d.DecisionPath, DefaultDecisionPath; got != want {
		t.Errorf("decision_path = %q, want %q", got, want)
	}
	if got, want := strings.Join(d.JWTAudiences, ","), "spiffe://example.org/writ/control-plane"; got != want {
		t.Errorf("jwt_audiences = %q, want %q", got, want)
	}
	if d.MaxBodyBytes != DefaultDecisionMaxBody || d.MaxEvaluations != DefaultMaxEvaluations || d.EvalTimeout.D() != DefaultDecisionTimeout {
		t.Errorf("limits = %d, %d, %s; want the defaults", d.MaxBodyBytes, d.MaxEvaluations, d.EvalTimeout.D())
	}
	// Off unless listen.decision is set: nothing required then.
	s, err = ParseServer("writ.yaml", []byte("trust_domain: example.org\ndatabase_url: postgres://localhost/writ\n"), noenv)
	if err != nil {
		t.Fatal(err)
	}
	if s.Listen.Decision != "" || s.Decision.DecisionPath != "" {
		t.Errorf("decision API configured by default: %+v", s.Decision)
	}
}

func TestParseServerEnvOverridesDatabase(t *testing.T) {
	env := func(k string) string {
		if k == "WRIT_DATABASE_URL" {
			return "postgres://override/db"
		}
		return ""
	}
	s, err := ParseServer("writ.yaml", []byte("trust_domain: example.org\ndatabase_url: postgres://file/db\n"), env)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := s.DatabaseURL, "postgres://override/db"; got != want {
		t.Errorf("database_url = %q, want %q", got, want)
	}
}

func TestParseServerErrors(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want string // substring of the error
	}{
		{"unknown key", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  htp: 1.2.3.4:5\n", "writ.yaml:4: listen.htp: field htp not found"},
		{"bad duration", "trust_domain: example.org\ndatabase_url: postgres://x/y\nca:\n  x509_svid_ttl: forever\n", "writ.yaml:4: ca.x509_svid_ttl: \"forever\" is not a duration"},
		{"ttl over max", "trust_domain: example.org\ndatabase_url: postgres://x/y\nca:\n  x509_svid_ttl: 2h\n  x509_svid_max_ttl: 1h\n", "writ.yaml:4: ca.x509_svid_ttl: 2h0m0s exceeds x509_svid_max_ttl"},
		{"missing trust domain", "database_url: postgres://x/y\n", "writ.yaml:1: trust_domain: required"},
		{"bad trust domain", "trust_domain: Example.ORG\ndatabase_url: postgres://x/y\n", "writ.yaml:1: trust_domain: trust domain \"Example.ORG\""},
		{"wrong type", "trust_domain: example.org\ndatabase_url: postgres://x/y\nadmin:\n  allowed_uids: nope\n", "writ.yaml:4: admin.allowed_uids"},
		{"second document", "trust_domain: example.org\n---\nfoo: 1\n", "unexpected second document"},
		{"empty", "", "empty document"},
		{"policy without dir", "trust_domain: example.org\ndatabase_url: postgres://x/y\npolicy:\n  bundle_name: mesh\n", "writ.yaml:3: policy.dir: required"},
		{"policy relative dir", "trust_domain: example.org\ndatabase_url: postgres://x/y\npolicy:\n  dir: policies\n", "writ.yaml:4: policy.dir: must be an absolute path"},
		{"policy bad bundle name", "trust_domain: example.org\ndatabase_url: postgres://x/y\npolicy:\n  dir: /p\n  bundle_name: a/b\n", "writ.yaml:5: policy.bundle_name"},
		{"policy without a listener", "trust_domain: example.org\ndatabase_url: postgres://x/y\npolicy:\n  dir: /p\n", "writ.yaml:3: policy: the bundle is served over mTLS on listen.decision"},
		{"policy unknown key", "trust_domain: example.org\ndatabase_url: postgres://x/y\npolicy:\n  dir: /p\n  bundle: x\n", "writ.yaml:5: policy.bundle: field bundle not found"},
		{"decision api without policies", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  decision: 127.0.0.1:8443\n", "decision.policy_dir: required with listen.decision"},
		{"decision api without admin policy", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  decision: 127.0.0.1:8443\ndecision:\n  policy_dir: /p\n", "decision.admin_policy_dir: required"},
		{"decision api bad listener", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  decision: nowhere\ndecision:\n  policy_dir: /p\n  admin_policy_dir: /a\n", "listen.decision: \"nowhere\" is not host:port"},
		{"decision api shares a listener", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  http: 127.0.0.1:9000\n  decision: 127.0.0.1:9000\ndecision:\n  policy_dir: /p\n  admin_policy_dir: /a\n", "already used by another listener"},
		{"decision api bad path", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  decision: 127.0.0.1:8443\ndecision:\n  policy_dir: /p\n  admin_policy_dir: /a\n  decision_path: writ.allow\n", "decision.decision_path"},
		{"decision api http base url", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  decision: 127.0.0.1:8443\ndecision:\n  policy_dir: /p\n  admin_policy_dir: /a\n  base_url: http://pdp.example.org\n", "decision.base_url"},
		{"decision api huge body", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  decision: 127.0.0.1:8443\ndecision:\n  policy_dir: /p\n  admin_policy_dir: /a\n  max_body_bytes: 1000000000\n", "decision.max_body_bytes"},
		{"decision api timeout", "trust_domain: example.org\ndatabase_url: postgres://x/y\nlisten:\n  decision: 127.0.0.1:8443\ndecision:\n  policy_dir: /p\n  admin_policy_dir: /a\n  eval_timeout: 2h\n", "decision.eval_timeout"},
		{"decision api unknown key", "trust_domain: example.org\ndatabase_url: postgres://x/y\ndecision:\n  policy: /p\n", "decision.policy: field policy not found"},
		{"audit retention under the minimum", "trust_domain: example.org\ndatabase_url: postgres://x/y\naudit:\n  retention_days: 30\n", "writ.yaml:4: audit.retention_days: 30 is shorter than min_retention_days (90)"},
		{"audit retention under a raised minimum", "trust_domain: example.org\ndatabase_url: postgres://x/y\naudit:\n  min_retention_days: 400\n", "audit.retention_days: 365 is shorter than min_retention_days (400)"},
		{"audit bad durability", "trust_domain: example.org\ndatabase_url: postgres://x/y\naudit:\n  durability: write\n", "writ.yaml:4: audit.durability: \"write\": want fsync-grouped or fsync-per-event"},
		{"audit fast retention job", "trust_domain: example.org\ndatabase_url: postgres://x/y\naudit:\n  retention_interval: 1s\n", "audit.retention_interval: must be at least 1m"},
		{"audit unknown key", "trust_domain: example.org\ndatabase_url: postgres://x/y\naudit:\n  retention: 30\n", "audit.retention: field retention not found"},
		{"registry stale within grace", "trust_domain: example.org\ndatabase_url: postgres://x/y\nmesh:\n  registry_grace: 2m\n", "mesh.registry_stale: 1m30s must exceed registry_grace (2m0s)"},
		{"mesh unknown key", "trust_domain: example.org\ndatabase_url: postgres://x/y\nmesh:\n  grace: 2m\n", "mesh.grace: field grace not found"},
		{"upstream incomplete", "trust_domain: example.org\ndatabase_url: postgres://x/y\nca:\n  upstream:\n    step_ca:\n      url: http://ca\n", "ca.upstream.step_ca.url: must be an https:// URL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseServer("writ.yaml", []byte(tt.yaml), noenv)
			if err == nil {
				t.Fatalf("got nil error, want one containing %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got error:\n%v\nwant it to contain %q", err, tt.want)
			}
		})
	}
}
