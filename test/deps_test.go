// Package test holds Writ's end-to-end suites and the checks that keep the
// package boundaries of ARCHITECTURE.md honest. Nothing imports it.
package test

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/writmesh/writ"

// allowed lists, for each top-level package, the top-level packages of
// ours it may import (its own subpackages always). internal/* are leaf
// utilities anyone may use.
var allowed = map[string][]string{
	"config":     {},
	"store":      {},
	"authority":  {"config", "store"},
	"policy":     {"config"},
	"enforcer":   {"policy", "audit", "config"},
	"audit":      {"store", "config"},
	"compliance": {"audit", "store", "config"},
	"xds":        {"config", "authority"},
	"proxy":      {"enforcer", "audit", "authority", "xds", "policy", "config"},
	"api":        {"config", "store", "authority", "policy", "enforcer", "audit", "compliance", "xds"},
	"console":    {"config", "store", "authority", "policy", "enforcer", "audit", "compliance", "xds", "api"},
	"cmd":        {"*"},
	"test":       {"*"},
	"internal":   {},
}

// isTestOnly reports test-support packages (pgtest, authoritytest, …),
// which only tests and other test-support packages may import.
func isTestOnly(pkg string) bool {
	return strings.HasSuffix(pkg, "test") && pkg != module+"/test"
}

func top(pkg string) string {
	rel := strings.TrimPrefix(strings.TrimPrefix(pkg, module), "/")
	first, _, _ := strings.Cut(rel, "/")
	return first
}

func TestImportArrows(t *testing.T) {
	out, err := exec.Command("go", "list", "-json", module+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	n := 0
	for {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		n++
		from := top(p.ImportPath)
		rules, ok := allowed[from]
		if !ok {
			t.Errorf("%s: top-level package %q is not in ARCHITECTURE.md's table (add it there and here)", p.ImportPath, from)
			continue
		}
		for _, imp := range p.Imports {
			if !strings.HasPrefix(imp, module+"/") {
				continue
			}
			to := top(imp)
			if isTestOnly(imp) && !isTestOnly(p.ImportPath) && from != "test" {
				t.Errorf("%s imports test-only package %s", p.ImportPath, imp)
			}
			if to == from || to == "internal" {
				continue
			}
			if to == "cmd" || to == "test" {
				t.Errorf("%s imports %s: nothing imports cmd or test", p.ImportPath, imp)
				continue
			}
			ok := false
			for _, a := range rules {
				if a == "*" || a == to {
					ok = true
				}
			}
			if !ok {
				t.Errorf("%s imports %s: %s may import only %v", p.ImportPath, imp, from, rules)
			}
		}
	}
	if n < 5 {
		t.Fatalf("go list saw only %d packages", n)
	}
}
