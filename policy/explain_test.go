package policy

import (
	"context"
	"strings"
	"testing"
)

func TestExplainShowsTheRulesThatDecided(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": pairPolicy, "mesh/data.json": pairData})
	e := newEngine(t, Options{Dir: dir})
	in := input(t, `{"attributes": {"source": {"principal": "spiffe://td/ns/a/sa/x"}, "destination": {"principal": "spiffe://td/ns/b/sa/y"}}}`)
	var out strings.Builder
	res, err := e.Explain(context.Background(), in, ExplainFull, &out)
	if err != nil {
		t.Fatal(err)
	}
	if res.Value != true || res.Cached {
		t.Fatalf("result %+v", res)
	}
	for _, want := range []string{"authz.rego:7", "data.envoy.authz.allow", "Exit"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("trace lacks %q:\n%s", want, out.String())
		}
	}
	if _, err := e.Explain(context.Background(), in, "everything", &out); err == nil {
		t.Fatal("unknown mode accepted")
	}
}
