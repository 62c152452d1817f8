package test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
)

// TestPolicyDiffReplaysRecordedDecisions: decisions of a real
// writ-enforcer are recorded in PostgreSQL; `writ policy diff` replays
// them against a candidate policy and reports, by service pair, exactly
// the decisions the candidate would change, with examples.
func TestPolicyDiffReplaysRecordedDecisions(t *testing.T) {
	w, client := enforcerWithAudit(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	intruder := "spiffe://example.org/ns/demo/sa/intruder"
	checks := []struct {
		src, method string
		want        code.Code
	}{
		{clientID.String(), "GET", code.Code_OK},
		{clientID.String(), "GET", code.Code_OK},
		{clientID.String(), "POST", code.Code_OK},
		{clientID.String(), "DELETE", code.Code_OK},
		{intruder, "GET", code.Code_PERMISSION_DENIED},
	}
	for i, c := range checks {
		resp, err := client.Check(ctx, checkReq(c.src, serverID.String(), c.method, fmt.Sprintf("/items/%d?page=1", i)))
		if err != nil || code.Code(resp.GetStatus().GetCode()) != c.want {
			t.Fatalf("check %d: %v %v", i, resp.GetStatus(), err)
		}
	}
	waitUntil(t, 60*time.Second, "the decisions in PostgreSQL", func() bool {
		return countAudit(t, w.dbURL, "kind = 'request'") == len(checks)
	})

	// The candidate: the client may only read; the intruder may read too.
	cand := t.TempDir()
	write(t, filepath.Join(cand, "p.rego"), `package envoy.authz

default allow := false

allow if {
	input.attributes.request.http.method == "GET"
	input.attributes.source.principal in {"`+clientID.String()+`", "`+intruder+`"}
}
`)
	out, code := w.writ(t, "policy", "diff", "--candidate", cand, "--since", "1h", "--format", "json")
	if code != 0 {
		t.Fatalf("policy diff: %d %s", code, out)
	}
	var rep struct {
		Replayed, Changed int
		Pairs             []struct {
			Source string
			Dec    int `json:"decisions"`
			AD     int `json:"allow_to_deny"`
			DA     int `json:"deny_to_allow"`
		}
		Examples []struct{ Method, Recorded, Candidate string }
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if rep.Replayed != 5 || rep.Changed != 3 || len(rep.Examples) != 3 {
		t.Fatalf("replayed %d, changed %d, %d examples; want 5, 3, 3:\n%s", rep.Replayed, rep.Changed, len(rep.Examples), out)
	}
	byPair := map[string][3]int{}
	for _, p := range rep.Pairs {
		byPair[p.Source] = [3]int{p.Dec, p.AD, p.DA}
	}
	if byPair[clientID.String()] != [3]int{4, 2, 0} || byPair[intruder] != [3]int{1, 0, 1} {
		t.Fatalf("pairs %v, want client 4 decisions 2 allow→deny, intruder 1 decision 1 deny→allow:\n%s", byPair, out)
	}
	if out, code := w.writ(t, "policy", "diff", "--candidate", cand, "--since", "1h", "--fail-on-change"); code != 1 {
		t.Fatalf("--fail-on-change with changes: exit %d\n%s", code, out)
	}
	// The enforced policy itself changes nothing.
	if out, code := w.writ(t, "policy", "diff", "--candidate", meshPolicyDir(t), "--since", "1h", "--fail-on-change"); code != 0 {
		t.Fatalf("diff against the running policy: exit %d\n%s", code, out)
	}
}
