package decision_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/open-policy-agent/opa/v1/plugins/rest"
	"github.com/open-policy-agent/opa/v1/server/types"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/api/decision"
)

// opaClient is OPA's own REST client (what OPA uses to reach remote
// services) configured for the decision API: client TLS with the caller's
// SVID, or a bearer token. SVIDs carry no DNS names, so the client cannot
// check the server's name the web PKI way and is told not to; the SPIFFE
// server check is the other tests' business.
func (e *env) opaClient(id spiffeid.ID, bearer string) rest.Client {
	e.t.Helper()
	cfg := map[string]any{"url": e.url, "allow_insecure_tls": true}
	creds := map[string]any{}
	if bearer != "" {
		creds["bearer"] = map[string]any{"token": bearer}
	} else {
		cert, key, err := issue(e.t, e.auth, id).Marshal()
		if err != nil {
			e.t.Fatal(err)
		}
		dir := e.t.TempDir()
		certFile, keyFile := filepath.Join(dir, "svid.pem"), filepath.Join(dir, "key.pem")
		if err := os.WriteFile(certFile, cert, 0o600); err != nil {
			e.t.Fatal(err)
		}
		if err := os.WriteFile(keyFile, key, 0o600); err != nil {
			e.t.Fatal(err)
		}
		creds["client_tls"] = map[string]any{"cert": certFile, "private_key": keyFile}
	}
	cfg["credentials"] = creds
	b, _ := json.Marshal(cfg)
	c, err := rest.New(b, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// queryOPA POSTs {"input": input} (or nothing when input is nil) to
// v1/data/path with OPA's client and decodes OPA's response type.
func queryOPA(t *testing.T, c rest.Client, method, path string, input any) (int, types.DataResponseV1, string) {
	t.Helper()
	if input != nil {
		c = c.WithJSON(types.DataRequestV1{Input: &input})
	}
	resp, err := c.Do(context.Background(), method, "v1/data/"+path)
	if err != nil {
		t.Fatalf("%s v1/data/%s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var out types.DataResponseV1
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &out); err != nil {
			t.Fatalf("decode %s: %v", body, err)
		}
	}
	return resp.StatusCode, out, string(body)
}

func TestDataAPIWithOPAClient(t *testing.T) {
	e := newEnv(t, envOptions{})
	alice := map[string]any{
		"subject":  map[string]any{"type": "user", "id": "alice@example.com"},
		"resource": map[string]any{"type": "document", "id": "1"},
		"action":   map[string]any{"name": "can_edit"},
	}
	bob := map[string]any{
		"subject":  map[string]any{"type": "user", "id": "bob@example.com"},
		"resource": map[string]any{"type": "document", "id": "1"},
		"action":   map[string]any{"name": "can_edit"},
	}
	clients := map[string]rest.Client{
		"client TLS": e.opaClient(appID, ""),
		"bearer":     e.opaClient(spiffeid.ID{}, e.token(appID, testAudience)),
	}
	for name, c := range clients {
		t.Run(name, func(t *testing.T) {
			tests := []struct {
				name, method, path string
				input              any
				want               string // JSON of result; "" for undefined
			}{
				{"allowed", "POST", "writ/authzen/allow", alice, `true`},
				{"denied", "POST", "writ/authzen/allow", bob, `false`},
				{"object decision", "POST", "writ/authzen/decision", bob, `{"decision": false, "context": {"reason": "subject may not perform this action"}}`},
				{"the caller as policy input is not the data API's", "POST", "writ/authzen/caller", map[string]any{}, ``},
				{"undefined document", "POST", "writ/authzen/nothing", alice, ``},
				{"GET without input", "GET", "writ/authzen/deny_reason", nil, `"subject may not perform this action"`},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					before := len(e.sink.records())
					status, resp, raw := queryOPA(t, c, tt.method, tt.path, tt.input)
					if status != http.StatusOK {
						t.Fatalf("status %d: %s", status, raw)
					}
					if tt.want == "" {
						if resp.Result != nil {
							t.Errorf("result = %v, want undefined (absent)", *resp.Result)
						}
						if strings.Contains(raw, `"result"`) {
							t.Errorf("undefined result present in %s", raw)
						}
					} else {
						if resp.Result == nil {
							t.Fatalf("result undefined, want %s (%s)", tt.want, raw)
						}
						got, _ := json.Marshal(*resp.Result)
						if canonical(t, string(got)) != canonical(t, tt.want) {
							t.Errorf("result = %s, want %s", got, tt.want)
						}
					}
					recs := e.sink.records()[before:]
					if len(recs) != 1 {
						t.Fatalf("%d records, want 1", len(recs))
					}
					rec := recs[0]
					if resp.DecisionID == "" || rec.ID != resp.DecisionID {
						t.Errorf("decision_id %q, record id %q: want equal and set", resp.DecisionID, rec.ID)
					}
					wantResult := decision.ResultDefined
					if tt.want == "" {
						wantResult = decision.ResultUndefined
					}
					if rec.API != decision.APIData || rec.Path != tt.path || rec.Result != wantResult || rec.Caller != appID.String() {
						t.Errorf("record = %+v", rec)
					}
					if (tt.input == nil) != (rec.InputDigest == "") {
						t.Errorf("input digest %q for input %v", rec.InputDigest, tt.input)
					}
				})
			}
		})
	}
	t.Run("admin policy refuses a path outside the grant", func(t *testing.T) {
		before := len(e.sink.records())
		status, _, raw := queryOPA(t, clients["client TLS"], "POST", "docs/1", alice)
		if status != http.StatusForbidden {
			t.Fatalf("status %d, want 403: %s", status, raw)
		}
		recs := e.sink.records()[before:]
		if len(recs) != 1 || recs[0].Result != decision.ResultForbidden || recs[0].Path != "docs/1" {
			t.Errorf("records = %+v, want one forbidden record of docs/1", recs)
		}
	})
	t.Run("the policy admin reads all data", func(t *testing.T) {
		status, resp, raw := queryOPA(t, e.opaClient(opsID, ""), "GET", "docs/2/owner", nil)
		if status != http.StatusOK || resp.Result == nil || (*resp.Result) != "carol@example.com" {
			t.Fatalf("status %d: %s", status, raw)
		}
	})
}

// The data API's JSON over plain HTTP requests, details an SDK hides.
func TestDataAPIRequests(t *testing.T) {
	e := newEnv(t, envOptions{})
	c := e.mtls(appID)
	ops := e.mtls(opsID)
	tests := []struct {
		name   string
		client *http.Client
		method string
		path   string
		body   string
		status int
		check  func(t *testing.T, m map[string]any)
	}{
		{"missing input is answered with a warning", c, "POST", "/v1/data/writ/authzen/allow", `{}`, 200, func(t *testing.T, m map[string]any) {
			if m["result"] != false {
				t.Errorf("result = %v, want false", m["result"])
			}
			if w, _ := m["warning"].(map[string]any); w["code"] != "api_usage_warning" {
				t.Errorf("warning = %v", m["warning"])
			}
		}},
		{"empty body is no input", c, "POST", "/v1/data/writ/authzen/allow", ``, 200, func(t *testing.T, m map[string]any) {
			if m["result"] != false || m["warning"] == nil {
				t.Errorf("got %v", m)
			}
		}},
		{"a trailing slash is no segment", c, "POST", "/v1/data/writ/authzen/allow/", `{"input": {}}`, 200, func(t *testing.T, m map[string]any) {
			if m["result"] != false || m["warning"] != nil {
				t.Errorf("got %v", m)
			}
		}},
		{"empty segments are refused, not redirected", c, "POST", "/v1/data/writ//authzen/allow", `{"input": {}}`, 400, nil},
		{"dot segments are refused, not redirected", c, "POST", "/v1/data/writ/x/../authzen/allow", `{"input": {}}`, 400, nil},
		{"escaped segments are read", c, "POST", "/v1/data/writ/%61uthzen/allow", `{"input": {}}`, 200, func(t *testing.T, m map[string]any) {
			if m["result"] != false {
				t.Errorf("result = %v", m["result"])
			}
		}},
		{"pretty", c, "POST", "/v1/data/writ/authzen/allow?pretty=true", `{"input": {}}`, 200, nil},
		{"all of data for the admin", ops, "GET", "/v1/data", ``, 200, func(t *testing.T, m map[string]any) {
			r, _ := m["result"].(map[string]any)
			if _, ok := r["docs"]; !ok {
				t.Errorf("result has no docs: %v", m)
			}
		}},
		{"all of data refused to an app", c, "GET", "/v1/data", ``, 403, nil},
		{"encoded slash refused", c, "POST", "/v1/data/writ/a%2Fb", `{"input": {}}`, 400, nil},
		{"unknown query parameter", c, "POST", "/v1/data/writ/authzen/allow?explain=full", `{"input": {}}`, 400, nil},
		{"input in a GET query", c, "GET", "/v1/data/writ/authzen/allow?input=%7B%7D", ``, 400, nil},
		{"unknown body key", c, "POST", "/v1/data/writ/authzen/allow", `{"input": {}, "inptu": 1}`, 400, nil},
		{"input null is no input", c, "POST", "/v1/data/writ/authzen/allow", `{"input": null}`, 200, nil},
		{"body not an object", c, "POST", "/v1/data/writ/authzen/allow", `[1]`, 400, nil},
		{"too many segments", ops, "GET", "/v1/data/" + strings.Repeat("a/", 40), ``, 400, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do(tt.client, tt.method, tt.path, tt.body, "")
			if r.status != tt.status {
				t.Fatalf("status %d, want %d: %s", r.status, tt.status, r.body)
			}
			m := r.json(t)
			if tt.status == 200 {
				if id, _ := m["decision_id"].(string); id == "" {
					t.Errorf("no decision_id in %s", r.body)
				}
			} else if m["code"] == nil || m["message"] == nil || m["result"] != nil {
				t.Errorf("error body %s, want code and message only", r.body)
			}
			if tt.check != nil {
				tt.check(t, m)
			}
		})
	}
}

func TestDataAPITimeout(t *testing.T) {
	e := newEnv(t, envOptions{evalTimeout: 20e6})
	r := e.do(e.mtls(appID), "POST", "/v1/data/writ/authzen/decision", `{"input": {"context": {"spin": true}}}`, "")
	if r.status != http.StatusInternalServerError {
		t.Fatalf("status %d, want 500: %s", r.status, r.body)
	}
	if m := r.json(t); m["result"] != nil || !strings.Contains(fmt.Sprint(m["message"]), "timed out") {
		t.Errorf("body %s", r.body)
	}
	recs := e.sink.records()
	if rec := recs[len(recs)-1]; rec.Result != decision.ResultError || rec.Cause != decision.CausePolicyError {
		t.Errorf("record = %+v", rec)
	}
}
