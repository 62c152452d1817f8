package enforcer

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/jonboulle/clockwork"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/writmesh/writ/policy"
	"google.golang.org/protobuf/proto"
)

// TestPrunedInputGivesSameDecisions checks that building only the input
// fields a policy can read changes no decision, for every shipped policy,
// the benchmark policy and one that reads the whole input.
func TestPrunedInputGivesSameDecisions(t *testing.T) {
	benchDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(benchDir, "rbac.rego"), []byte(benchPolicy()), 0o644); err != nil {
		t.Fatal(err)
	}
	wholeDir := policyDir(t, "package envoy.authz\n\nallow if input[_].source.principal == \"spiffe://cluster.local/ns/shop/sa/frontend\"\n")
	aliasDir := policyDir(t, "package envoy.authz\n\nimport input.attributes.request.http as http_request\n\ndefault allow := false\n\nallow if {\n\thttp_request.method == \"GET\"\n\tstartswith(http_request.path, \"/api/v1/svc1\")\n}\n\nallow if http_request.headers[\"x-random\"] < \"4\"\n")
	reqs := append(variedRequests(200), benchRequests(2000, true)...)
	for _, r := range []struct{ name, dir string }{
		{"mesh", filepath.Join("..", "policies", "mesh")},
		{"rbac", filepath.Join("..", "policies", "rbac")},
		{"envoy-example", filepath.Join("..", "policies", "envoy-example")},
		{"bench", benchDir},
		{"import alias", aliasDir},
		{"whole input", wholeDir},
	} {
		t.Run(r.name, func(t *testing.T) {
			sink := SinkFunc(func(context.Context, Decision) error { return nil })
			pruned := newEnforcer(t, r.dir, sink, clockwork.NewRealClock())
			full := newEnforcer(t, r.dir, sink, clockwork.NewRealClock())
			full.fullInput = true
			allowed := 0
			for i, req := range reqs {
				pr, pd := pruned.Check(context.Background(), req)
				fr, fd := full.Check(context.Background(), req)
				if !proto.Equal(pr, fr) || pd.Result != fd.Result || pd.Reason != fd.Reason {
					t.Fatalf("request %d: pruned %v (%s), full %v (%s)", i, pr, pd.Reason, fr, fd.Reason)
				}
				if pd.Result == ResultAllow {
					allowed++
				}
			}
			t.Logf("%d of %d allowed", allowed, len(reqs))
		})
	}
}

func TestNeedTree(t *testing.T) {
	n := newNeed([][]string{{"attributes", "request", "http", "method"}, {"attributes", "source"}, {"parsed_path"}}, false)
	for _, tt := range []struct {
		path []string
		want string // "all", "some", "none"
	}{
		{[]string{"attributes"}, "some"},
		{[]string{"attributes", "source"}, "all"},
		{[]string{"attributes", "source", "address"}, "all"},
		{[]string{"attributes", "destination"}, "none"},
		{[]string{"attributes", "request", "http", "headers"}, "none"},
		{[]string{"parsed_path"}, "all"},
		{[]string{"writ"}, "none"},
	} {
		c := n
		for _, k := range tt.path {
			c = c.child(k)
		}
		got := "some"
		switch {
		case c == nil:
			got = "none"
		case c.all:
			got = "all"
		}
		if got != tt.want {
			t.Errorf("%v: %s, want %s", tt.path, got, tt.want)
		}
	}
	if !newNeed(nil, true).all {
		t.Fatal("whole input not needed in full")
	}
	in, _, err := buildInput(goldenRequests()["http1_mtls_json_body"], DefaultMaxBodyBytes, n)
	if err != nil {
		t.Fatal(err)
	}
	want := ast.MustParseTerm(`{"attributes": {"request": {"http": {"method": "POST"}}, "source": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 51236}}, "principal": "spiffe://cluster.local/ns/shop/sa/frontend"}}, "parsed_path": ["api", "v1", "users", "42", "orders"], "parsed_query": {}}`).Value
	if in.Compare(want) != 0 {
		t.Fatalf("pruned input %v, want %v", in, want)
	}
}

// TestReloadWidensInput: after a reload to a policy that reads more of the
// input, the enforcer builds the new fields.
func TestReloadWidensInput(t *testing.T) {
	dir := policyDir(t, "package envoy.authz\n\nallow if input.attributes.request.http.method == \"GET\"\n")
	eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(Options{Engine: eng, Sink: SinkFunc(func(context.Context, Decision) error { return nil })})
	if err != nil {
		t.Fatal(err)
	}
	req := simpleRequest(clientID, "GET", "/", map[string]string{"x-team": "blue"})
	if _, d := e.Check(context.Background(), req); d.Result != ResultAllow {
		t.Fatalf("first policy: %+v", d)
	}
	rego := "package envoy.authz\n\nallow if input.attributes.request.http.headers[\"x-team\"] == \"blue\"\n"
	if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte(rego), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := eng.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, d := e.Check(context.Background(), req); d.Result != ResultAllow {
		t.Fatalf("after reload the header was not in the input: %+v", d)
	}
}
