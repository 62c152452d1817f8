package decision_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/writmesh/writ/api/decision"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/policy"
)

const aliceReads = `{"subject": {"type": "user", "id": "alice@example.com"}, "resource": {"type": "document", "id": "1"}, "action": {"name": "can_read"}}`

func TestAuthentication(t *testing.T) {
	e := newEnv(t, envOptions{})
	anon := e.client(nil)
	app := e.mtls(appID)
	appTok := e.token(appID, testAudience)
	tests := []struct {
		name   string
		client *http.Client
		bearer string
		status int
		auth   string // recorded authentication, when answered
	}{
		{"no credentials", anon, "", 401, ""},
		{"X.509 SVID", app, "", 200, decision.AuthX509},
		{"JWT-SVID", anon, appTok, 200, decision.AuthJWT},
		{"JWT-SVID and X.509 SVID of the same caller", app, appTok, 200, decision.AuthX509},
		{"JWT-SVID of another caller than the certificate", app, e.token(opsID, testAudience), 401, ""},
		{"JWT-SVID for another audience", anon, e.token(appID, "spiffe://example.org/elsewhere"), 401, ""},
		{"not a JWT", anon, "not-a-token", 401, ""},
		{"tampered JWT", anon, appTok[:len(appTok)-4] + "AAAA", 401, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(e.sink.records())
			r := e.do(tt.client, "POST", "/access/v1/evaluation", aliceReads, tt.bearer)
			if r.status != tt.status {
				t.Fatalf("status %d, want %d: %s", r.status, tt.status, r.body)
			}
			recs := e.sink.records()[before:]
			if tt.status != 200 {
				if got := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer") {
					t.Errorf("WWW-Authenticate = %q", got)
				}
				if len(recs) != 0 {
					t.Errorf("%d records for an unauthenticated request", len(recs))
				}
				return
			}
			if len(recs) != 1 || recs[0].Auth != tt.auth || recs[0].Caller != appID.String() {
				t.Errorf("records = %+v, want one by %s via %s", recs, appID, tt.auth)
			}
		})
	}
	t.Run("basic auth is not a bearer token", func(t *testing.T) {
		r := e.do(anon, "POST", "/access/v1/evaluation", aliceReads, "", "Authorization", "Basic YTpi")
		if r.status != 401 {
			t.Errorf("status %d, want 401", r.status)
		}
	})
	t.Run("certificate of another authority fails the handshake", func(t *testing.T) {
		other := authoritytest.Start(t, authoritytest.Options{})
		c := e.client(issue(t, other, appID))
		req, _ := http.NewRequest("POST", e.url+"/access/v1/evaluation", strings.NewReader(aliceReads))
		if resp, err := c.Do(req); err == nil {
			resp.Body.Close()
			t.Fatalf("request with a foreign SVID answered %d", resp.StatusCode)
		}
	})
}

func TestAdminPolicyRefusesCaller(t *testing.T) {
	e := newEnv(t, envOptions{})
	for name, c := range map[string]*http.Client{"x509": e.mtls(guestID)} {
		t.Run(name, func(t *testing.T) {
			r := e.do(c, "POST", "/access/v1/evaluation", aliceReads, "")
			if r.status != http.StatusForbidden {
				t.Fatalf("status %d, want 403: %s", r.status, r.body)
			}
			if m := r.json(t); m["decision"] != nil || !strings.Contains(m["message"].(string), guestID.String()) {
				t.Errorf("body %s", r.body)
			}
		})
	}
	r := e.do(e.client(nil), "POST", "/access/v1/evaluations", `{"evaluations": []}`, e.token(guestID, testAudience))
	if r.status != http.StatusForbidden {
		t.Fatalf("JWT guest: status %d, want 403: %s", r.status, r.body)
	}
	recs := e.sink.records()
	if len(recs) != 2 {
		t.Fatalf("%d records, want 2", len(recs))
	}
	for _, rec := range recs {
		if rec.Result != decision.ResultForbidden || rec.Cause != decision.CauseAdminPolicy || rec.Caller != guestID.String() || rec.PolicyRevision == "" {
			t.Errorf("record = %+v", rec)
		}
	}
}

// A record the sink refuses withholds the answer: 503, no decision.
func TestAuditFailureFailsClosed(t *testing.T) {
	e := newEnv(t, envOptions{})
	c := e.mtls(appID)
	e.sink.setErr(errSinkDown)
	tests := []struct{ name, path, body string }{
		{"evaluation", "/access/v1/evaluation", aliceReads},
		{"evaluations", "/access/v1/evaluations", `{"evaluations": [` + aliceReads + `, ` + aliceReads + `]}`},
		{"data", "/v1/data/writ/authzen/allow", `{"input": ` + aliceReads + `}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do(c, "POST", tt.path, tt.body, "")
			if r.status != http.StatusServiceUnavailable {
				t.Fatalf("status %d, want 503: %s", r.status, r.body)
			}
			m := r.json(t)
			for _, k := range []string{"decision", "evaluations", "result", "decision_id"} {
				if _, ok := m[k]; ok {
					t.Errorf("withheld answer carries %q: %s", k, r.body)
				}
			}
		})
	}
	t.Run("a refusal that cannot be audited", func(t *testing.T) {
		if r := e.do(e.mtls(guestID), "POST", "/access/v1/evaluation", aliceReads, ""); r.status != http.StatusServiceUnavailable {
			t.Errorf("status %d, want 503", r.status)
		}
	})
	if got := mustVec(t, e, "writ_decision_api_audit_errors_total").sum(); got < 4 {
		t.Errorf("audit errors counted %v, want at least 4", got)
	}
	e.sink.setErr(nil)
	if r := e.do(c, "POST", "/access/v1/evaluation", aliceReads, ""); r.status != 200 {
		t.Errorf("after the sink recovered: status %d", r.status)
	}
}

// mustVec sums a metric family's samples.
func mustVec(t *testing.T, e *env, name string) sumCollector {
	return sumCollector{t: t, e: e, name: name}
}

type sumCollector struct {
	t    *testing.T
	e    *env
	name string
}

func (s sumCollector) sum() float64 {
	mfs, err := s.e.reg.Gather()
	if err != nil {
		s.t.Fatal(err)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != s.name {
			continue
		}
		for _, m := range mf.GetMetric() {
			total += m.GetCounter().GetValue() + float64(m.GetHistogram().GetSampleCount())
		}
	}
	return total
}

func TestMetrics(t *testing.T) {
	e := newEnv(t, envOptions{})
	c := e.mtls(appID)
	e.do(c, "POST", "/access/v1/evaluation", aliceReads, "")
	e.do(c, "POST", "/access/v1/evaluations", `{"evaluations": [`+aliceReads+`, `+strings.Replace(aliceReads, `"1"`, `"2"`, 1)+`]}`, "")
	e.do(c, "POST", "/v1/data/writ/authzen/allow", `{"input": {}}`, "")
	e.do(e.client(nil), "POST", "/v1/data/writ/authzen/allow", `{"input": {}}`, "")
	want := `
# HELP writ_decision_api_decisions_total Answers of the decision API (one per AuthZEN evaluation or data query), by API and result.
# TYPE writ_decision_api_decisions_total counter
writ_decision_api_decisions_total{api="authzen",result="allow"} 2
writ_decision_api_decisions_total{api="authzen",result="deny"} 1
writ_decision_api_decisions_total{api="data",result="defined"} 1
# HELP writ_decision_api_requests_total HTTP requests to the decision API, by API and status code.
# TYPE writ_decision_api_requests_total counter
writ_decision_api_requests_total{api="authzen",code="200"} 2
writ_decision_api_requests_total{api="data",code="200"} 1
writ_decision_api_requests_total{api="data",code="401"} 1
`
	if err := testutil.GatherAndCompare(e.reg, strings.NewReader(want), "writ_decision_api_decisions_total", "writ_decision_api_requests_total"); err != nil {
		t.Error(err)
	}
	if n := mustVec(t, e, "writ_decision_api_request_duration_seconds").sum(); n != 4 {
		t.Errorf("latency histogram has %v samples, want 4", n)
	}
}

// The shipped admin policy passes its own Rego tests.
func TestShippedAdminPolicy(t *testing.T) {
	var out strings.Builder
	passed, failed, err := policy.RunTests(context.Background(), filepath.Join("..", "..", "policies", "admin"), &out, false)
	if err != nil || failed != 0 || passed < 8 {
		t.Fatalf("passed %d, failed %d, err %v:\n%s", passed, failed, err, out.String())
	}
	// And it loads as the admin engine.
	if _, err := policy.NewEngine(context.Background(), decision.AdminEngineOptions(filepath.Join("..", "..", "policies", "admin"))); err != nil {
		t.Fatal(err)
	}
}

func TestNewRequiresEverything(t *testing.T) {
	if _, err := decision.New(decision.Options{}); err == nil {
		t.Fatal("New with no options: got no error")
	}
}

// Served with svidtls.ServerConfig (a client SVID required at the
// handshake), the handler takes the caller from the verified chain, and
// a caller without a certificate cannot connect.
func TestServedWithSvidtlsServerConfig(t *testing.T) {
	e := newEnv(t, envOptions{svidtls: true})
	r := e.do(e.mtls(appID), "POST", "/access/v1/evaluation", aliceReads, "")
	if r.status != 200 || canonical(t, string(r.body)) != `{"decision":true}` {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	if recs := e.sink.records(); len(recs) != 1 || recs[0].Caller != appID.String() || recs[0].Auth != decision.AuthX509 {
		t.Errorf("records = %+v", recs)
	}
	req, _ := http.NewRequest("POST", e.url+"/access/v1/evaluation", strings.NewReader(aliceReads))
	req.Header.Set("Authorization", "Bearer "+e.token(appID, testAudience))
	if resp, err := e.client(nil).Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("a caller without a certificate was answered %d", resp.StatusCode)
	}
}

// A change of the admin policy's grants takes effect on reload, without a
// restart, and a bad one never replaces the running policy.
func TestAdminPolicyReload(t *testing.T) {
	e := newEnv(t, envOptions{})
	guest := e.mtls(guestID)
	if r := e.do(guest, "POST", "/access/v1/evaluation", aliceReads, ""); r.status != http.StatusForbidden {
		t.Fatalf("before: status %d, want 403", r.status)
	}
	grants := strings.Replace(testGrants, `"spiffe://example.org/ns/apps/sa/*"], "apis": ["authzen"]`,
		`"spiffe://example.org/ns/apps/sa/*", "spiffe://example.org/ns/guest/sa/*"], "apis": ["authzen"]`, 1)
	if err := os.WriteFile(filepath.Join(e.adminDir, "data.json"), []byte(grants), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.admin.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r := e.do(guest, "POST", "/access/v1/evaluation", aliceReads, ""); r.status != http.StatusOK {
		t.Fatalf("after the grant: status %d: %s", r.status, r.body)
	}
	if err := os.WriteFile(filepath.Join(e.adminDir, "admin.rego"), []byte("package writ.admin\n\nallow if {"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.admin.Reload(context.Background()); err == nil {
		t.Fatal("a broken admin policy was accepted")
	}
	if r := e.do(guest, "POST", "/access/v1/evaluation", aliceReads, ""); r.status != http.StatusOK {
		t.Fatalf("after a rejected reload: status %d, want the running policy's 200", r.status)
	}
}

// A sink that takes batches gets an AuthZEN batch's records in one call,
// and a batch it refuses leaves no record.
func TestBatchSink(t *testing.T) {
	bs := &batchSink{recordingSink: &recordingSink{}}
	e := newEnv(t, envOptions{sink: bs})
	c := e.mtls(appID)
	body := `{"evaluations": [` + aliceReads + `, ` + aliceReads + `, ` + aliceReads + `]}`
	if r := e.do(c, "POST", "/access/v1/evaluations", body, ""); r.status != 200 {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	if len(bs.batches) != 1 || len(bs.batches[0]) != 3 {
		t.Fatalf("batches = %d, want one of 3 records", len(bs.batches))
	}
	bs.setErr(errSinkDown)
	if r := e.do(c, "POST", "/access/v1/evaluations", body, ""); r.status != http.StatusServiceUnavailable {
		t.Fatalf("refused batch: status %d, want 503", r.status)
	}
	if n := len(bs.records()); n != 3 {
		t.Errorf("%d records after a refused batch, want the first batch's 3", n)
	}
}
