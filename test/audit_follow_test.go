package test

import (
	"bufio"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/writmesh/writ/internal/syncbuf"
)

// TestAuditQueryFollow runs `writ audit query --follow` as a process
// against a real writd: mesh changes made after it started arrive as JSON
// lines, filtered by kind, once each, and SIGINT ends it with exit 0.
func TestAuditQueryFollow(t *testing.T) {
	w := startWritd(t)
	cmd := exec.Command(filepath.Join(binDir(t), "writ"), "--admin-socket", w.socket,
		"audit", "query", "--kind", "config_change", "--since", "1h", "--follow", "--format", "json")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &syncbuf.Buffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	lines := make(chan map[string]any, 16)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) == nil {
				lines <- m
			}
		}
		done <- cmd.Wait()
	}()
	defer func() { _ = cmd.Process.Kill() }()
	// The tail is live once writd's connection for it listens.
	pool := openPool(t, w.dbURL)
	waitUntil(t, 30*time.Second, "the follower's LISTEN", func() bool {
		var n int
		_ = pool.QueryRow(t.Context(), "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN writ_audit'").Scan(&n)
		return n == 1
	})
	mdir := t.TempDir()
	write(t, filepath.Join(mdir, "1-service.yaml"), meshService)
	write(t, filepath.Join(mdir, "2-route.yaml"), meshRoute)
	if out, code := w.writ(t, "apply", "-f", mdir); code != 0 {
		t.Fatalf("apply: %s", out)
	}
	got := map[string]int{}
	for len(got) < 2 {
		select {
		case m := <-lines:
			if m["kind"] != "config_change" {
				t.Fatalf("followed an event of kind %v despite --kind config_change: %v", m["kind"], m)
			}
			got[m["resource"].(string)]++
		case <-time.After(30 * time.Second):
			t.Fatalf("followed %v; stderr: %s", got, stderr)
		}
	}
	if got["Service/demo/greeter"] != 1 || got["Route/demo/greeter"] != 1 {
		t.Fatalf("followed %v, want the service and the route once each", got)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("writ audit query --follow after SIGINT: %v; stderr: %s", err, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("writ audit query --follow did not stop on SIGINT")
	}
	select {
	case m := <-lines:
		t.Fatalf("an extra line: %v", m)
	default:
	}
}
