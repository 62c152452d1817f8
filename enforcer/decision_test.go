package enforcer

import (
	"encoding/json"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/open-policy-agent/opa/v1/util"
	"google.golang.org/genproto/googleapis/rpc/code"
)

func decisionValue(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := util.UnmarshalJSON([]byte(s), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func headerList(hs []*corev3.HeaderValueOption) string {
	var parts []string
	for _, h := range hs {
		parts = append(parts, h.GetHeader().GetKey()+"="+h.GetHeader().GetValue())
	}
	return strings.Join(parts, ",")
}

// TestMapDecision covers the decision shapes opa-envoy-plugin documents.
func TestMapDecision(t *testing.T) {
	tests := []struct {
		name               string
		decision           string
		allowed            bool
		status             int
		headers, add, body string
		remove             []string
		meta               string
	}{
		{name: "true", decision: `true`, allowed: true, status: 200},
		{name: "false", decision: `false`, status: 403},
		{name: "object allow with headers", decision: `{"allowed": true, "headers": {"x-b": "2", "x-a": "1"}}`, allowed: true, status: 200, headers: "x-a=1,x-b=2"},
		{name: "header values as list", decision: `{"allowed": true, "headers": {"x-a": ["1", "2"]}}`, allowed: true, status: 200, headers: "x-a=1,x-a=2"},
		{name: "headers as list of objects", decision: `{"allowed": true, "headers": [{"x-a": "1"}, {"x-a": "2", "x-b": "3"}]}`, allowed: true, status: 200, headers: "x-a=1,x-a=2,x-b=3"},
		{name: "response headers and removals", decision: `{"allowed": true, "response_headers_to_add": {"x-r": "v"}, "request_headers_to_remove": ["authorization", "cookie"]}`, allowed: true, status: 200, add: "x-r=v", remove: []string{"authorization", "cookie"}},
		{name: "allowed ignores http_status and body", decision: `{"allowed": true, "http_status": 418, "body": "no"}`, allowed: true, status: 200},
		{name: "deny default status", decision: `{"allowed": false}`, status: 403},
		{name: "deny with status, body, headers", decision: `{"allowed": false, "http_status": 429, "body": "slow down", "headers": {"retry-after": "10"}}`, status: 429, body: "slow down", headers: "retry-after=10"},
		{name: "dynamic metadata", decision: `{"allowed": true, "dynamic_metadata": {"user": "ann", "n": 2, "tags": ["a"]}}`, allowed: true, status: 200, meta: `{"n":2,"tags":["a"],"user":"ann"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := mapDecision(decisionValue(t, tt.decision))
			if err != nil {
				t.Fatal(err)
			}
			r := out.resp
			if out.allowed != tt.allowed || out.status != tt.status {
				t.Fatalf("allowed %v status %d, want %v %d", out.allowed, out.status, tt.allowed, tt.status)
			}
			if tt.allowed {
				ok := r.GetOkResponse()
				if r.GetStatus().GetCode() != int32(code.Code_OK) || headerList(ok.GetHeaders()) != tt.headers ||
					headerList(ok.GetResponseHeadersToAdd()) != tt.add || strings.Join(ok.GetHeadersToRemove(), ",") != strings.Join(tt.remove, ",") {
					t.Fatalf("ok response %v", r)
				}
			} else {
				den := r.GetDeniedResponse()
				if r.GetStatus().GetCode() != int32(code.Code_PERMISSION_DENIED) || int(den.GetStatus().GetCode()) != tt.status ||
					den.GetBody() != tt.body || headerList(den.GetHeaders()) != tt.headers {
					t.Fatalf("denied response %v", r)
				}
			}
			if tt.meta != "" {
				got, _ := json.Marshal(r.GetDynamicMetadata().AsMap())
				if string(got) != tt.meta {
					t.Fatalf("dynamic metadata %s, want %s", got, tt.meta)
				}
			}
		})
	}
	for _, bad := range []string{`"allow"`, `null`, `1`, `[]`, `{}`, `{"allowed": 1}`, `{"allowed": false, "http_status": "403"}`,
		`{"allowed": false, "http_status": 99}`, `{"allowed": false, "body": 1}`, `{"allowed": true, "headers": "x"}`,
		`{"allowed": true, "headers": [1]}`, `{"allowed": true, "headers": {"x": [1]}}`, `{"allowed": true, "request_headers_to_remove": [1]}`,
		`{"allowed": true, "response_headers_to_add": {"x": true}}`, `{"allowed": true, "dynamic_metadata": "x"}`} {
		if _, err := mapDecision(decisionValue(t, bad)); err == nil {
			t.Errorf("decision %s accepted", bad)
		}
	}
}
