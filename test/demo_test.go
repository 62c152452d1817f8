package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
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

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestDemo runs `make demo`'s script the way README describes it, with real
// binaries and a throwaway PostgreSQL: writd, a join token and entries
// through the CLI, the agent, and go-spiffe's own example client and
// server talking over mTLS with SVIDs from the agent.
func TestDemo(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("the demo needs curl")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "scripts/demo.sh")
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(),
		"WRIT_DEMO_EXIT=1",
		"WRIT_BIN_DIR="+binDir(t),
		"WRIT_DEMO_DIR="+filepath.Join(openTempDir(t), "demo"),
		"WRIT_DEMO_HTTP="+freeAddr(t),
		"WRIT_DEMO_GRPC="+freeAddr(t),
		"WRIT_DEMO_AGENT_ADMIN="+freeAddr(t),
	)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out)
	}
	for _, want := range []string{`Server says: "Hello client\n"`, "stopped;"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
	// writ cert list shows both workloads' SVIDs.
	for _, id := range []string{"spiffe://example.org/client", "spiffe://example.org/server"} {
		found := false
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) > 3 && f[1] == "x509-svid" && f[2] == "issued" && f[3] == id {
				found = true
			}
		}
		if !found {
			t.Errorf("writ cert list in the demo shows no issued SVID for %s:\n%s", id, out)
		}
	}
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
