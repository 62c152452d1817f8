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
	s, err = ParseServer("writ.yaml", []byte("trust_domain: example.org\ndatabase_url: postgres://localhost/writ\npolicy:\n  dir: /etc/writ/policies\n"), noenv)
	if err != nil {
		t.Fatal(err)
	}
	if s.Policy.BundleName != "mesh" || s.Policy.PollInterval.D() != 2*time.Second {
		t.Errorf("policy defaults %+v, want bundle_name mesh and poll_interval 2s", s.Policy)
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
		{"policy unknown key", "trust_domain: example.org\ndatabase_url: postgres://x/y\npolicy:\n  dir: /p\n  bundle: x\n", "writ.yaml:5: policy.bundle: field bundle not found"},
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
