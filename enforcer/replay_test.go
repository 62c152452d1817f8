package enforcer

import (
	"context"
	"testing"

	"github.com/writmesh/writ/audit"
)

// TestReplayReproducesRecordedDecisions records decisions as audit events
// (with the default header allowlist), rebuilds each request from its
// event and checks that the same policy decides the rebuilt request the
// same way — what `writ policy diff` relies on — and that a header the
// allowlist dropped is absent on replay.
func TestReplayReproducesRecordedDecisions(t *testing.T) {
	rec := &recorder{}
	e := newEnforcer(t, policyDir(t, `package envoy.authz

default allow := false

allow if {
	input.attributes.request.http.method == "GET"
	startswith(input.parsed_path[0], "items")
	input.parsed_query.page == ["2"]
	input.attributes.request.http.headers["user-agent"] == "curl/8"
	input.attributes.request.http.host == "orders.shop"
}

allow if {
	input.attributes.request.http.method == "POST"
	input.attributes.request.http.headers["x-tenant"] == "a"
}
`), rec, nil)
	red, err := audit.NewRedaction(audit.DefaultAllowedHeaders)
	if err != nil {
		t.Fatal(err)
	}
	reqs := []struct {
		name                 string
		method, path         string
		headers              map[string]string
		sameOnReplay, allows bool
	}{
		{"allowed with query and header", "GET", "/items/./1?page=2", map[string]string{"user-agent": "curl/8", "authorization": "Bearer x"}, true, true},
		{"denied for the query", "GET", "/items/1?page=3", map[string]string{"user-agent": "curl/8"}, true, false},
		{"denied for the header", "GET", "/items/1?page=2", map[string]string{"user-agent": "wget"}, true, false},
		{"denied for the method", "DELETE", "/items/1", nil, true, false},
		// x-tenant is not on the allowlist: recorded without it, the
		// replay is denied where the original was allowed.
		{"allowed by a header not kept", "POST", "/items", map[string]string{"x-tenant": "a"}, false, true},
	}
	for _, r := range reqs {
		t.Run(r.name, func(t *testing.T) {
			rec.got = nil
			e.Check(context.Background(), simpleRequest(clientID, r.method, r.path, r.headers))
			d := rec.got[0]
			if (d.Result == ResultAllow) != r.allows {
				t.Fatalf("original: %s (%s)", d.Result, d.Reason)
			}
			ev, err := DecisionEvent(d, red, d.Headers)
			if err != nil {
				t.Fatal(err)
			}
			if !Replayable(ev) {
				t.Fatalf("event with cause %q is not replayable", ev.Cause)
			}
			req, err := ReplayRequest(ev)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := req.GetAttributes().GetRequest().GetHttp().GetHeaders()["authorization"]; ok {
				t.Fatal("replayed request carries a credential header")
			}
			rec.got = nil
			e.Check(context.Background(), req)
			got := rec.got[0]
			if same := got.Result == d.Result && got.HTTPStatus == d.HTTPStatus; same != r.sameOnReplay {
				t.Fatalf("replay: %s %d (%s), original %s %d; same = %v, want %v", got.Result, got.HTTPStatus, got.Reason, d.Result, d.HTTPStatus, same, r.sameOnReplay)
			}
			if got.Path != d.Path || got.Source != d.Source || got.Destination != d.Destination {
				t.Fatalf("replay saw %s %s→%s, original %s %s→%s", got.Path, got.Source, got.Destination, d.Path, d.Source, d.Destination)
			}
		})
	}
}
