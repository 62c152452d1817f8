package test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/writmesh/writ/internal/freeport"
)

// repoRoot is the module's root directory.
func repoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

// binDir returns a directory with writd, writ and writ-proxy: make test's
// ./bin (WRIT_BIN_DIR), or a fresh build.
func binDir(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("WRIT_BIN_DIR"); d != "" {
		return d
	}
	buildOnce.Do(func() {
		d, err := os.MkdirTemp("", "writ-bin-")
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", d+"/", "./cmd/...")
		cmd.Dir = repoRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build: %v\n%s", err, out)
			return
		}
		builtDir = d
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtDir
}

var (
	buildOnce sync.Once
	builtDir  string
	buildErr  error
)

// freeAddr is a loopback address for another process to bind, on a port
// outgoing connections cannot be holding (internal/freeport).
func freeAddr(t testing.TB) string {
	t.Helper()
	return freeport.Addr(t)
}

// TestDemo runs make demo's script end to end: PostgreSQL, writd, four
// sample services behind writ-proxies configured over ADS, and the load.
// What the demo claims must be so: the 90/10 split shows, frontend ->
// payments is denied every time, the retries happened, and the denials
// are in the audit trail.
func TestDemo(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("the demo needs curl")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const requests = 200
	cmd := exec.CommandContext(ctx, "bash", "scripts/demo.sh")
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(),
		"WRIT_DEMO_EXIT=1",
		"WRIT_BIN_DIR="+binDir(t),
		"WRIT_DEMO_DIR="+filepath.Join(openTempDir(t), "demo"),
		"WRIT_DEMO_PORT_BASE="+strconv.Itoa(freePortRange(t, 50)),
		"WRIT_DEMO_REQUESTS="+strconv.Itoa(requests),
	)
	b, err := cmd.CombinedOutput()
	out := string(b)
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out)
	}
	// The load's tally: "  COUNT  OUTCOME" lines.
	tally := map[string]int{}
	for _, line := range strings.Split(out, "\n") {
		if n, what, ok := strings.Cut(strings.TrimSpace(line), "  "); ok {
			if v, err := strconv.Atoi(n); err == nil {
				tally[strings.TrimSpace(what)] = v
			}
		}
	}
	v1, v2 := tally["orders v1: ok"], tally["orders v2: ok"]
	if v1+v2 < requests*95/100 || v2 < requests*3/100 || v2 > requests*20/100 {
		t.Errorf("orders v1 %d, v2 %d of %d requests: not a 90/10 split that retries keep whole\n%s", v1, v2, requests, out)
	}
	if got := tally["frontend -> payments: denied by policy (403)"]; got != requests {
		t.Errorf("frontend -> payments denied %d times of %d\n%s", got, requests, out)
	}
	if got := tally["payments v1: ok"]; got < requests*95/100 {
		t.Errorf("orders -> payments succeeded %d times of %d\n%s", got, requests, out)
	}
	retried := false
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "writ_upstream_retries_total{") && !strings.HasSuffix(line, " 0") {
			retried = true
		}
	}
	if !retried {
		t.Errorf("the demo shows no retries\n%s", out)
	}
	// The audit trail holds the denials: "writ audit query --result deny"
	// rows name frontend as the source.
	if !regexp.MustCompile(`(?m)^\S+\s+request\s+spiffe://cluster\.local/ns/shop/sa/frontend\s+spiffe://cluster\.local/ns/shop/sa/payments\s.*\bdeny\b`).MatchString(out) {
		t.Errorf("writ audit query in the demo shows no denied decision of frontend's\n%s", out)
	}
	for _, want := range []string{"all chains intact", "stopped;"} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}

// freePortRange finds n consecutive free loopback ports and returns the
// first (internal/freeport).
func freePortRange(t *testing.T, n int) int {
	t.Helper()
	return freeport.Range(t, n)
}

// openTempDir is a temp dir other users may traverse: as root, the demo's
// PostgreSQL runs as the postgres user and must reach its data directory.
func openTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "writ-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	if err := os.Chmod(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestMain(m *testing.M) {
	code := m.Run()
	if builtDir != "" {
		os.RemoveAll(builtDir)
	}
	os.Exit(code)
}
