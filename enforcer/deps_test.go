package enforcer

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImportArrows keeps enforcer below the packages that use it (it may
// import policy and audit), as
// ARCHITECTURE.md's package table says, and off OPA's SDK and plugins.
func TestImportArrows(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{
			"github.com/writmesh/writ/proxy", "github.com/writmesh/writ/api",
			"github.com/writmesh/writ/cmd",
			"github.com/open-policy-agent/opa/v1/sdk", "github.com/open-policy-agent/opa/v1/plugins",
			"github.com/open-policy-agent/opa/v1/server",
		} {
			if dep == banned || strings.HasPrefix(dep, banned+"/") {
				t.Errorf("enforcer imports %s", dep)
			}
		}
	}
}
