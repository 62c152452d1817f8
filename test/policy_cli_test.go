package test

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/writmesh/writ/policy"
)

// runWrit runs the built writ CLI (no writd needed for policy commands)
// and returns its combined output and exit code.
// runWrit runs the writ binary from binDir and returns its output and
// exit code.
func runWrit(t testing.TB, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir(t), "writ"), args...)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

// TestPolicyTestCommand runs `writ policy test` on the shipped policies and
// on a set with a failing test, which must exit 1 as `opa test` does.
func TestPolicyTestCommand(t *testing.T) {
	root := repoRoot(t)
	var dirs []string
	for _, d := range []string{"mesh", "rbac", "jwt", "envoy-example"} {
		dirs = append(dirs, filepath.Join(root, "policies", d))
	}
	out, code := runWrit(t, append(append([]string{"policy", "test"}, dirs...), "-v", "--coverage")...)
	if code != 0 {
		t.Fatalf("exit %d on the shipped policies:\n%s", code, out)
	}
	for _, want := range []string{"PASS", "coverage:", "mesh.rego:", "test_"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}

	bad := meshPolicyDir(t)
	write(t, filepath.Join(bad, "mesh_test.rego"), `package envoy.authz_test

import data.envoy.authz

test_intruder_allowed if {
	authz.allow with input as {"writ": {"source": {"namespace": "demo", "service_account": "intruder"},
		"destination": {"namespace": "demo", "service_account": "server"}}}
}
`)
	out, code = runWrit(t, "policy", "test", bad)
	if code != 1 || !strings.Contains(out, "FAIL") || !strings.Contains(out, "test_intruder_allowed") {
		t.Fatalf("exit %d, want 1 with the failing test named:\n%s", code, out)
	}
	if _, code := runWrit(t, "policy", "test"); code != 2 {
		t.Fatalf("no directory: exit %d, want 2", code)
	}
}

// TestPolicyEvalCommand evaluates the mesh policy on a raw input document
// and on Envoy CheckRequests, with and without --explain.
func TestPolicyEvalCommand(t *testing.T) {
	dir := meshPolicyDir(t)
	tmp := t.TempDir()
	rawInput := filepath.Join(tmp, "input.json")
	write(t, rawInput, `{"writ": {"source": {"trust_domain": "example.org", "namespace": "demo", "service_account": "client"},
		"destination": {"trust_domain": "example.org", "namespace": "demo", "service_account": "server"}}}`)
	checkJSON := func(src, path string) string {
		return `{"attributes": {"source": {"principal": "` + src + `"}, "destination": {"principal": "` + serverID.String() + `"},
			"request": {"http": {"method": "GET", "path": "` + path + `", "host": "server", "headers": {":path": "` + path + `"}}}}}`
	}
	allowReq := filepath.Join(tmp, "allow.json")
	write(t, allowReq, checkJSON(clientID.String(), "/a/./b//c"))
	denyReq := filepath.Join(tmp, "deny.json")
	write(t, denyReq, checkJSON("spiffe://example.org/ns/demo/sa/intruder", "/"))
	badPath := filepath.Join(tmp, "badpath.json")
	write(t, badPath, checkJSON(clientID.String(), "/a%2fb"))

	type enf struct {
		Result     string `json:"result"`
		HTTPStatus int    `json:"http_status"`
		Path       string `json:"path"`
	}
	type result struct {
		Defined  bool     `json:"defined"`
		Result   any      `json:"result"`
		Rules    []string `json:"matched_rules"`
		Enforcer *enf     `json:"enforcer"`
	}
	tests := []struct {
		name   string
		args   []string
		result any
		enf    *enf
	}{
		{"raw input", []string{"--input", rawInput}, true, nil},
		{"check request allowed", []string{"--input", allowReq}, true, &enf{"allow", 200, "/a/b/c"}},
		{"check request denied", []string{"--input", denyReq}, false, &enf{"deny", 403, "/"}},
		{"bad path refused before policy", []string{"--input", badPath}, nil, &enf{"deny", 400, ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, code := runWrit(t, append([]string{"policy", "eval", "--policy", dir}, tt.args...)...)
			if code != 0 {
				t.Fatalf("exit %d:\n%s", code, out)
			}
			var got result
			if err := json.Unmarshal([]byte(out), &got); err != nil {
				t.Fatalf("output is not JSON: %v\n%s", err, out)
			}
			if got.Result != tt.result || got.Defined != (tt.result != nil) {
				t.Errorf("result %v (defined %v), want %v\n%s", got.Result, got.Defined, tt.result, out)
			}
			if (got.Enforcer == nil) != (tt.enf == nil) || (tt.enf != nil && *got.Enforcer != *tt.enf) {
				t.Errorf("enforcer %+v, want %+v\n%s", got.Enforcer, tt.enf, out)
			}
			// The answer names its rule: the allow rule, or the default.
			if tt.result != nil {
				want := " data.envoy.authz.allow"
				if tt.result == false {
					want = " default data.envoy.authz.allow"
				}
				if len(got.Rules) != 1 || !strings.HasSuffix(got.Rules[0], want) || (tt.result == true && strings.Contains(got.Rules[0], "default")) {
					t.Errorf("matched rules %q, want one ending in %q\n%s", got.Rules, want, out)
				}
			}
		})
	}
	t.Run("bundle file", func(t *testing.T) {
		b, err := policy.BuildBundle(context.Background(), dir, policy.Options{})
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(t.TempDir(), "mesh.tar.gz")
		write(t, file, string(b.Data))
		out, code := runWrit(t, "policy", "eval", "--policy", file, "--input", allowReq)
		if code != 0 || !strings.Contains(out, `"result": true`) || !strings.Contains(out, b.Revision) {
			t.Fatalf("exit %d, want the allowed result and revision %s:\n%s", code, b.Revision, out)
		}
	})
	t.Run("explain", func(t *testing.T) {
		out, code := runWrit(t, "policy", "eval", "--policy", dir, "--input", allowReq, "--explain", "full")
		if code != 0 || !strings.Contains(out, "mesh.rego:") || !strings.Contains(out, `"result": true`) {
			t.Fatalf("exit %d, want a trace naming mesh.rego and the result:\n%s", code, out)
		}
	})
	t.Run("errors", func(t *testing.T) {
		if out, code := runWrit(t, "policy", "eval", "--policy", dir); code != 2 {
			t.Errorf("no input: exit %d, want 2\n%s", code, out)
		}
		if out, code := runWrit(t, "policy", "eval", "--policy", dir, "--input", rawInput, "--explain", "loud"); code != 1 || !strings.Contains(out, "--explain") {
			t.Errorf("bad --explain: exit %d\n%s", code, out)
		}
		if out, code := runWrit(t, "policy", "eval", "--policy", dir, "--input", rawInput, "--decision", "data.envoy.authz.nothing"); code != 1 || !strings.Contains(out, "data.envoy.authz.nothing") {
			t.Errorf("undefined decision path: exit %d\n%s", code, out)
		}
		broken := t.TempDir()
		write(t, filepath.Join(broken, "x.rego"), "package envoy.authz\n\nallow if {\n")
		if out, code := runWrit(t, "policy", "eval", "--policy", broken, "--input", rawInput); code != 1 || !strings.Contains(out, "x.rego:") {
			t.Errorf("broken policy: exit %d, want 1 naming x.rego:line\n%s", code, out)
		}
	})
}
