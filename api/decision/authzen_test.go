package decision_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/writmesh/writ/api/decision"
)

// The AuthZEN 1.0 examples, told with this package's own documents: a
// single evaluation answers {"decision": ...} with an optional context.
func TestAuthZENEvaluation(t *testing.T) {
	e := newEnv(t, envOptions{})
	c := e.mtls(appID)
	const (
		allowRule = "authzen.rego:23 data.writ.authzen.decision"
		denyRule  = "authzen.rego:28 data.writ.authzen.decision"
	)
	tests := []struct {
		name    string
		body    string
		want    string // response body
		matched string // the rule the audit record names
	}{
		{"owner reads", `{"subject": {"type": "user", "id": "alice@example.com"},
			"resource": {"type": "document", "id": "1"},
			"action": {"name": "can_read", "properties": {"method": "GET"}},
			"context": {"time": "2026-11-22T01:22:00-07:00"}}`,
			`{"decision": true}`, allowRule},
		{"reader may not edit: denial carries a reason", `{"subject": {"type": "user", "id": "bob@example.com"},
			"resource": {"type": "document", "id": "1"}, "action": {"name": "can_edit"}}`,
			`{"decision": false, "context": {"reason": "subject may not perform this action"}}`, denyRule},
		{"subject properties are policy input", `{"subject": {"type": "user", "id": "erin@example.com", "properties": {"department": "sales", "ip_address": "172.217.22.14"}},
			"resource": {"type": "document", "id": "3"}, "action": {"name": "can_read"}}`,
			`{"decision": true}`, allowRule},
		{"unknown resource", `{"subject": {"type": "user", "id": "alice@example.com"},
			"resource": {"type": "document", "id": "404"}, "action": {"name": "can_read"}}`,
			`{"decision": false, "context": {"reason": "resource not found"}}`, denyRule},
		{"context is optional", `{"subject": {"type": "user", "id": "carol@example.com"},
			"resource": {"type": "document", "id": "2"}, "action": {"name": "can_edit"}}`,
			`{"decision": true}`, allowRule},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do(c, "POST", "/access/v1/evaluation", tt.body, "", "X-Request-ID", "req-"+strings.ReplaceAll(tt.name, " ", "-"))
			if r.status != http.StatusOK {
				t.Fatalf("status %d: %s", r.status, r.body)
			}
			if got, want := canonical(t, string(r.body)), canonical(t, tt.want); got != want {
				t.Errorf("got %s, want %s", got, want)
			}
			if got, want := r.header.Get("X-Request-ID"), "req-"+strings.ReplaceAll(tt.name, " ", "-"); got != want {
				t.Errorf("X-Request-ID = %q, want %q echoed", got, want)
			}
			if got := r.header.Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type = %q", got)
			}
			recs := e.sink.records()
			if got := recs[len(recs)-1].MatchedRules; len(got) != 1 || got[0] != tt.matched {
				t.Errorf("record names rules %q, want %q", got, tt.matched)
			}
		})
	}
}

// The batch endpoint: top-level defaults, item overrides, and the three
// evaluation semantics of the specification's "read three documents"
// example (allowed, denied, allowed).
func TestAuthZENEvaluations(t *testing.T) {
	e := newEnv(t, envOptions{})
	c := e.mtls(appID)
	threeDocs := func(semantic string) string {
		opts := ""
		if semantic != "" {
			opts = `"options": {"evaluations_semantic": "` + semantic + `"},`
		}
		return `{"subject": {"type": "user", "id": "alice@example.com"}, "action": {"name": "can_read"}, ` + opts + `
			"evaluations": [{"resource": {"type": "document", "id": "1"}},
			                {"resource": {"type": "document", "id": "2"}},
			                {"resource": {"type": "document", "id": "3"}}]}`
	}
	denied2 := `{"decision": false, "context": {"reason": "subject may not perform this action"}}`
	tests := []struct {
		name      string
		body      string
		want      string
		evaluated int // audit records written
	}{
		{"default semantic executes all", threeDocs(""),
			`{"evaluations": [{"decision": true}, ` + denied2 + `, {"decision": true}]}`, 3},
		{"execute_all", threeDocs("execute_all"),
			`{"evaluations": [{"decision": true}, ` + denied2 + `, {"decision": true}]}`, 3},
		{"deny_on_first_deny stops at the denial", threeDocs("deny_on_first_deny"),
			`{"evaluations": [{"decision": true}, ` + denied2 + `]}`, 2},
		{"permit_on_first_permit stops at the permit", threeDocs("permit_on_first_permit"),
			`{"evaluations": [{"decision": true}]}`, 1},
		{"other options are ignored", `{"options": {"another_option": 1}, "evaluations": [
			{"subject": {"type": "user", "id": "carol@example.com"}, "resource": {"type": "document", "id": "2"}, "action": {"name": "can_read"}}]}`,
			`{"evaluations": [{"decision": true}]}`, 1},
		{"an item's action overrides the default", `{"subject": {"type": "user", "id": "bob@example.com"},
			"context": {"time": "2026-11-22T15:22:00-07:00"}, "action": {"name": "can_read"},
			"evaluations": [{"resource": {"type": "document", "id": "1"}},
			                {"action": {"name": "can_edit"}, "resource": {"type": "document", "id": "1"}}]}`,
			`{"evaluations": [{"decision": true}, {"decision": false, "context": {"reason": "subject may not perform this action"}}]}`, 2},
		{"items without defaults", `{"evaluations": [
			{"subject": {"type": "user", "id": "dave@example.com"}, "action": {"name": "can_edit"}, "resource": {"type": "document", "id": "3"}},
			{"subject": {"type": "user", "id": "dave@example.com"}, "action": {"name": "can_edit"}, "resource": {"type": "document", "id": "1"}}]}`,
			`{"evaluations": [{"decision": true}, {"decision": false, "context": {"reason": "subject may not perform this action"}}]}`, 2},
		{"no evaluations array: one evaluation", `{"subject": {"type": "user", "id": "alice@example.com"},
			"resource": {"type": "document", "id": "1"}, "action": {"name": "can_edit"}}`,
			`{"decision": true}`, 1},
		{"empty evaluations array: one evaluation", `{"subject": {"type": "user", "id": "alice@example.com"},
			"resource": {"type": "document", "id": "2"}, "action": {"name": "can_edit"}, "evaluations": []}`,
			denied2, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(e.sink.records())
			r := e.do(c, "POST", "/access/v1/evaluations", tt.body, "")
			if r.status != http.StatusOK {
				t.Fatalf("status %d: %s", r.status, r.body)
			}
			if got, want := canonical(t, string(r.body)), canonical(t, tt.want); got != want {
				t.Errorf("got  %s\nwant %s", got, want)
			}
			recs := e.sink.records()[before:]
			if len(recs) != tt.evaluated {
				t.Fatalf("%d audit records, want %d", len(recs), tt.evaluated)
			}
			for i, rec := range recs {
				if rec.Item != i || rec.API != decision.APIAuthZEN || rec.Caller != appID.String() || rec.Auth != decision.AuthX509 ||
					rec.PolicyRevision == "" || !strings.HasPrefix(rec.InputDigest, "sha256:") || rec.ID == "" {
					t.Errorf("record %d = %+v", i, rec)
				}
			}
		})
	}
}

func TestAuthZENBadRequests(t *testing.T) {
	e := newEnv(t, envOptions{maxBody: 4096})
	c := e.mtls(appID)
	valid := `"subject": {"type": "user", "id": "a"}, "resource": {"type": "doc", "id": "1"}, "action": {"name": "can_read"}`
	tests := []struct {
		name, path, body, ctype string
		status                  int
		msg                     string // substring of the error message
	}{
		{"empty body", "/access/v1/evaluation", "", "", 400, "body is empty"},
		{"not JSON", "/access/v1/evaluation", `{"subject": `, "application/json", 400, "invalid JSON"},
		{"unknown top-level key", "/access/v1/evaluation", `{` + valid + `, "extra": 1}`, "application/json", 400, `unknown field "extra"`},
		{"unknown subject key", "/access/v1/evaluation", `{"subject": {"type": "user", "id": "a", "name": "x"}, "resource": {"type": "doc", "id": "1"}, "action": {"name": "r"}}`, "application/json", 400, `unknown field "name"`},
		{"duplicate key", "/access/v1/evaluation", `{` + valid + `, "subject": {"type": "user", "id": "b"}}`, "application/json", 400, `duplicate key "subject"`},
		{"trailing data", "/access/v1/evaluation", `{` + valid + `} {}`, "application/json", 400, "after the top-level value"},
		{"wrong type", "/access/v1/evaluation", `{"subject": {"type": "user", "id": 7}, "resource": {"type": "doc", "id": "1"}, "action": {"name": "r"}}`, "application/json", 400, "subject.id: want a string"},
		{"missing members", "/access/v1/evaluation", `{"subject": {"type": "user"}, "action": {}}`, "application/json", 400, "subject.id, resource, action.name"},
		{"single endpoint has no evaluations", "/access/v1/evaluation", `{` + valid + `, "evaluations": []}`, "application/json", 400, `unknown field "evaluations"`},
		{"item missing after defaults", "/access/v1/evaluations", `{"subject": {"type": "user", "id": "a"}, "evaluations": [{"action": {"name": "r"}, "resource": {"type": "doc", "id": "1"}}, {"resource": {"type": "doc", "id": "2"}}]}`, "application/json", 400, "evaluations[1].action"},
		{"bad semantic", "/access/v1/evaluations", `{"options": {"evaluations_semantic": "first_wins"}, "evaluations": [{` + valid + `}]}`, "application/json", 400, "evaluations_semantic"},
		{"too deep", "/access/v1/evaluation", `{` + valid + `, "context": ` + strings.Repeat(`{"a": `, 70) + `1` + strings.Repeat(`}`, 70) + `}`, "application/json", 400, "nested deeper"},
		{"too large", "/access/v1/evaluation", `{` + valid + `, "context": {"pad": "` + strings.Repeat("x", 5000) + `"}}`, "application/json", 413, "exceeds 4096 bytes"},
		{"not JSON media type", "/access/v1/evaluation", `{` + valid + `}`, "text/plain", 415, "application/json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(e.sink.records())
			h := []string{}
			if tt.ctype != "" {
				h = append(h, "Content-Type", tt.ctype)
			}
			r := e.do(c, "POST", tt.path, tt.body, "", h...)
			if r.status != tt.status {
				t.Fatalf("status %d, want %d: %s", r.status, tt.status, r.body)
			}
			m := r.json(t)
			if msg, _ := m["message"].(string); !strings.Contains(msg, tt.msg) {
				t.Errorf("message %q, want it to contain %q", msg, tt.msg)
			}
			if _, has := m["decision"]; has {
				t.Error("an error response carries a decision")
			}
			if n := len(e.sink.records()) - before; n != 0 {
				t.Errorf("%d records for a refused request", n)
			}
		})
	}
	t.Run("wrong method", func(t *testing.T) {
		if r := e.do(c, "GET", "/access/v1/evaluation", "", ""); r.status != http.StatusMethodNotAllowed {
			t.Errorf("GET evaluation: status %d, want 405", r.status)
		}
	})
	t.Run("bad request id", func(t *testing.T) {
		r := e.do(c, "POST", "/access/v1/evaluation", `{`+valid+`}`, "", "X-Request-ID", strings.Repeat("x", 300))
		if r.status != http.StatusBadRequest {
			t.Errorf("long X-Request-ID: status %d, want 400", r.status)
		}
	})
}

func TestAuthZENMetadata(t *testing.T) {
	e := newEnv(t, envOptions{})
	// Public: no credentials needed.
	r := e.do(e.client(nil), "GET", "/.well-known/authzen-configuration", "", "")
	if r.status != http.StatusOK {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	base := e.url
	want := `{"policy_decision_point": "` + base + `", "access_evaluation_endpoint": "` + base + `/access/v1/evaluation",
		"access_evaluations_endpoint": "` + base + `/access/v1/evaluations",
		"search_subject_endpoint": "` + base + `/access/v1/search/subject",
		"search_resource_endpoint": "` + base + `/access/v1/search/resource",
		"search_action_endpoint": "` + base + `/access/v1/search/action"}`
	if got, want := canonical(t, string(r.body)), canonical(t, want); got != want {
		t.Errorf("got %s, want %s", got, want)
	}
	for k, want := range map[string]string{"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"} {
		if got := r.header.Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
}

func TestAuthZENTimeoutDenies(t *testing.T) {
	e := newEnv(t, envOptions{evalTimeout: 20e6}) // 20ms; the policy spins for seconds
	r := e.do(e.mtls(appID), "POST", "/access/v1/evaluation", `{"subject": {"type": "user", "id": "alice@example.com"},
		"resource": {"type": "document", "id": "1"}, "action": {"name": "can_read"}, "context": {"spin": true}}`, "")
	if r.status != http.StatusOK {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	want := `{"decision": false, "context": {"error": {"status": 503, "message": "policy evaluation timed out"}}}`
	if got, want := canonical(t, string(r.body)), canonical(t, want); got != want {
		t.Errorf("got %s, want %s", got, want)
	}
	recs := e.sink.records()
	if rec := recs[len(recs)-1]; rec.Result != decision.ResultDeny || rec.Cause != decision.CausePolicyError {
		t.Errorf("record = %+v, want a policy_error deny", rec)
	}
}
