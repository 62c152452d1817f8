package main

import (
	"bytes"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSIGTERMStopsTheBinary builds writ-proxy (or takes it from
// WRIT_BIN_DIR, as make test provides), runs it as a real process, and
// checks that SIGTERM stops it cleanly: exit status 0 and the socket gone.
func TestSIGTERMStopsTheBinary(t *testing.T) {
	bin := writProxyBinary(t)
	adminAddr := freeAddr(t)
	sock := filepath.Join(t.TempDir(), "agent.sock")
	cmd := exec.Command(bin,
		"--control-plane", freeAddr(t), // nothing listens: the agent keeps retrying
		"--trust-bundle", writeBundle(t),
		"--trust-domain", "example.org",
		"--workload-api", "unix://"+sock,
		"--admin-addr", adminAddr,
	)
	cmd.Env = append(os.Environ(), "WRIT_JOIN_TOKEN=secret-token")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	waitHTTP(t, "http://"+adminAddr+"/healthz", http.StatusOK)

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("writ-proxy exited with %v; stderr:\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("writ-proxy ignored SIGTERM")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after SIGTERM: %v", err)
	}
	if strings.Contains(stderr.String(), "secret-token") {
		t.Fatal("the join token reached the log")
	}
	if !strings.Contains(stderr.String(), "writ-proxy stopped") {
		t.Fatalf("no clean stop in the log:\n%s", stderr.String())
	}
}

// writProxyBinary is the writ-proxy executable: WRIT_BIN_DIR's, as make
// test provides, or one built from this package for the test.
func writProxyBinary(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("WRIT_BIN_DIR"); dir != "" {
		return filepath.Join(dir, "writ-proxy")
	}
	bin := filepath.Join(t.TempDir(), "writ-proxy")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}
