package policy

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"
)

func TestParseDataPath(t *testing.T) {
	tests := []struct {
		name, path, want string
		err              bool
	}{
		{"root", "", "data", false},
		{"simple", "envoy/authz/allow", "data.envoy.authz.allow", false},
		{"empty segments skipped", "/envoy//authz/", "data.envoy.authz", false},
		{"integer indexes", "writ/list/0", "data.writ.list[0]", false},
		{"leading zero is a key", "writ/list/007", `data.writ.list["007"]`, false},
		{"odd key", "writ/a-b", `data.writ["a-b"]`, false},
		{"quote refused", `writ/"x`, "", true},
		{"nul refused", "writ/\x00", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ref, err := ParseDataPath(tt.path)
			if tt.err {
				if err == nil {
					t.Fatalf("ParseDataPath(%q) = %v, want error", tt.path, ref)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := ref.String(); got != tt.want {
				t.Errorf("ParseDataPath(%q) = %s, want %s", tt.path, got, tt.want)
			}
		})
	}
}

func TestSnapshotEvalPath(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"authz.rego": `package envoy.authz

default allow := false

allow if input.user == "alice"

roles contains r if some r in data.roles[input.user]
`,
		"data.json": `{"roles": {"alice": ["admin", "dev"]}, "list": [10, 20]}`,
	})
	e := newEngine(t, Options{Dir: dir})
	s := e.Snapshot()
	ctx := context.Background()
	tests := []struct {
		name    string
		path    string
		input   string // "" for no input
		defined bool
		want    string // JSON
	}{
		{"decision rule with input", "envoy/authz/allow", `{"user": "alice"}`, true, `true`},
		{"default without input", "envoy/authz/allow", "", true, `false`},
		{"set rule", "envoy/authz/roles", `{"user": "alice"}`, true, `["admin", "dev"]`},
		{"plain data", "roles/alice/1", "", true, `"dev"`},
		{"array index", "list/1", "", true, `20`},
		{"undefined document", "envoy/authz/nothing", `{}`, false, ``},
		{"undefined in data", "roles/bob", "", false, ``},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ref, err := ParseDataPath(tt.path)
			if err != nil {
				t.Fatal(err)
			}
			var in ast.Value
			if tt.input != "" {
				in = input(t, tt.input)
			}
			r, err := s.EvalPath(ctx, ref, in)
			if err != nil {
				t.Fatal(err)
			}
			if r.Defined != tt.defined {
				t.Fatalf("defined = %v, want %v (value %v)", r.Defined, tt.defined, r.Value)
			}
			if r.Revision != s.Revision() {
				t.Errorf("revision = %q, want %q", r.Revision, s.Revision())
			}
			if !tt.defined {
				return
			}
			var want any
			if err := json.Unmarshal([]byte(tt.want), &want); err != nil {
				t.Fatal(err)
			}
			got, _ := json.Marshal(r.Value)
			var gotv any
			_ = json.Unmarshal(got, &gotv)
			if !reflect.DeepEqual(gotv, want) {
				t.Errorf("value = %s, want %s", got, tt.want)
			}
		})
	}

	t.Run("whole data", func(t *testing.T) {
		r, err := s.EvalPath(ctx, ast.Ref{ast.DefaultRootDocument}, nil)
		if err != nil || !r.Defined {
			t.Fatalf("EvalPath(data) = %+v, %v", r, err)
		}
		if _, ok := r.Value.(map[string]any)["envoy"]; !ok {
			t.Errorf("data has no envoy document: %v", r.Value)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := s.EvalPath(cctx, ast.MustParseRef("data.envoy.authz.allow"), nil); err == nil {
			t.Fatal("cancelled context: got no error")
		}
	})
	t.Run("non-ground refused", func(t *testing.T) {
		if _, err := s.EvalPath(ctx, ast.MustParseRef("data.roles[x]"), nil); err == nil {
			t.Fatal("non-ground path: got no error")
		}
	})
	t.Run("prepared queries are bounded", func(t *testing.T) {
		for i := range maxPreparedPaths + 10 {
			ref, _ := ParseDataPath(fmt.Sprintf("roles/u%d", i))
			if r, err := s.EvalPath(ctx, ref, nil); err != nil || r.Defined {
				t.Fatalf("EvalPath(%s) = %+v, %v", ref, r, err)
			}
		}
		s.set.paths.mu.Lock()
		n := len(s.set.paths.m)
		s.set.paths.mu.Unlock()
		if n > maxPreparedPaths {
			t.Errorf("%d prepared queries kept, want at most %d", n, maxPreparedPaths)
		}
	})
}
