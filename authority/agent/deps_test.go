package agent

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImports keeps the agent small: of Writ's own packages it may use
// only the node API, selectors and svidtls. It runs inside sidecars, so the CA,
// the store and anything above authority must stay out of it.
func TestImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/writmesh/writ/authority/agent").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	allowed := map[string]bool{
		"github.com/writmesh/writ/authority/agent":    true,
		"github.com/writmesh/writ/authority/nodeapi":  true,
		"github.com/writmesh/writ/authority/selector": true,
		"github.com/writmesh/writ/authority/svidtls":  true,
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "github.com/writmesh/writ/") && !allowed[p] {
			t.Errorf("authority/agent depends on %s", p)
		}
	}
}
