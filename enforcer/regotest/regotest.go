// Package regotest builds enforcers from inline Rego for tests of the
// packages that embed one (proxy, the end-to-end suites). Only tests
// import it.
package regotest

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/policy"
)

// Enforcer is an enforcer deciding with one Rego module (written to a
// temp dir and loaded like any policy directory) and recording to sink.
func Enforcer(t testing.TB, rego string, sink enforcer.Sink) *enforcer.Enforcer {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "policy.rego"), []byte(rego), 0o644); err != nil {
		t.Fatal(err)
	}
	eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	e, err := enforcer.New(enforcer.Options{Engine: eng, Sink: sink})
	if err != nil {
		t.Fatal(err)
	}
	return e
}
