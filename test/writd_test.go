package test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/store/pgtest"
)

// writd is a writd process started for one test.
type writd struct {
	bin, dir, http, grpc, socket string
	dbURL                        string
	cmd                          *exec.Cmd
	log                          *bytes.Buffer
	done                         chan error
}

// writdOptions add to the config file startWritd writes.
type writdOptions struct {
	listenDecision string // listen.decision
	extra          string // top-level YAML appended
}

// startWritd starts writd with a fresh database.
func startWritd(t testing.TB, opts ...writdOptions) *writd {
	t.Helper()
	w := &writd{bin: binDir(t), dir: t.TempDir(), http: freeAddr(t), grpc: freeAddr(t), log: &bytes.Buffer{}, done: make(chan error, 1)}
	w.socket = filepath.Join(w.dir, "admin", "admin.sock")
	kek, err := exec.Command(filepath.Join(w.bin, "writd"), "gen-kek").Output()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.dir, "kek"), kek, 0o600); err != nil {
		t.Fatal(err)
	}
	var o writdOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	listen := fmt.Sprintf("listen:\n  http: %s\n  grpc: %s\n", w.http, w.grpc)
	if o.listenDecision != "" {
		listen += fmt.Sprintf("  decision: %s\n", o.listenDecision)
	}
	w.dbURL = pgtest.URL(t)
	cfg := fmt.Sprintf("trust_domain: example.org\ndatabase_url: %q\n%sadmin:\n  socket: %s\nca:\n  kek_file: %s\n",
		w.dbURL, listen, w.socket, filepath.Join(w.dir, "kek")) + o.extra
	if err := os.WriteFile(filepath.Join(w.dir, "writ.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	w.cmd = exec.Command(filepath.Join(w.bin, "writd"), "serve", "--config", filepath.Join(w.dir, "writ.yaml"))
	w.cmd.Stdout, w.cmd.Stderr = w.log, w.log
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.done <- w.cmd.Wait() }()
	t.Cleanup(func() {
		_ = w.cmd.Process.Kill()
		<-w.done
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + w.http + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return w
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("writd not ready: %v\n%s", err, w.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// writ runs the CLI against w and returns its output and exit code.
func (w *writd) writ(t testing.TB, args ...string) (string, int) {
	t.Helper()
	return runWrit(t, append([]string{"--admin-socket", w.socket}, args...)...)
}

func (w *writd) get(t testing.TB, path string) string {
	t.Helper()
	resp, err := http.Get("http://" + w.http + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s: %s", path, resp.Status, b)
	}
	return string(b)
}

func TestWritdAndCLI(t *testing.T) {
	w := startWritd(t)

	// The bundle endpoint speaks the SPIFFE bundle format.
	b, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("example.org"), []byte(w.get(t, "/bundle")))
	if err != nil {
		t.Fatalf("GET /bundle is not a SPIFFE bundle: %v", err)
	}
	if len(b.X509Authorities()) != 1 || len(b.JWTAuthorities()) == 0 {
		t.Fatalf("bundle: %d x509, %d jwt authorities", len(b.X509Authorities()), len(b.JWTAuthorities()))
	}
	if seq, ok := b.SequenceNumber(); !ok || seq == 0 {
		t.Fatal("bundle has no spiffe_sequence")
	}
	if got := w.get(t, "/healthz"); got != "ok\n" {
		t.Fatalf("/healthz = %q", got)
	}
	if m := w.get(t, "/metrics"); !strings.Contains(m, "writ_identities_issued_total") || !strings.Contains(m, "go_goroutines") {
		t.Fatalf("/metrics lacks writ and go metrics:\n%.500s", m)
	}

	out, code := w.writ(t, "token", "create", "--spiffe-id", "spiffe://example.org/node/n1", "--ttl", "5m")
	if code != 0 || !strings.Contains(out, "Token: ") {
		t.Fatalf("token create: %d %s", code, out)
	}
	out, code = w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/n1", "--spiffe-id", "spiffe://example.org/ns/default/sa/web", "--selector", "unix:uid:1000")
	if code != 0 || !strings.Contains(out, "spiffe://example.org/ns/default/sa/web") {
		t.Fatalf("entry create: %d %s", code, out)
	}
	out, code = w.writ(t, "entry", "create", "--parent", "spiffe://example.org/node/n1", "--spiffe-id", "spiffe://evil.org/x", "--selector", "unix:uid:1000")
	if code != 1 || !strings.Contains(out, "outside trust domain") {
		t.Fatalf("foreign entry: %d %s", code, out)
	}
	out, code = w.writ(t, "entry", "create", "--spiffe-id", "spiffe://example.org/x")
	if code != 2 || !strings.Contains(out, "required") {
		t.Fatalf("missing flags: %d %s", code, out)
	}
	out, code = w.writ(t, "entry", "list", "-o", "json")
	if code != 0 || strings.Count(out, `"spiffe_id"`) != 1 {
		t.Fatalf("entry list: %d %s", code, out)
	}

	// Root rotation starts, reports its phase, and refuses a second start.
	out, code = w.writ(t, "ca", "rotate-root", "--no-wait")
	if code != 0 || !strings.Contains(out, "Root rotation: prepared") {
		t.Fatalf("rotate-root: %d %s", code, out)
	}
	out, code = w.writ(t, "ca", "rotate-root", "--no-wait")
	if code != 1 || !strings.Contains(out, "already in progress") {
		t.Fatalf("second rotate-root: %d %s", code, out)
	}
	out, code = w.writ(t, "ca", "status")
	if code != 0 || !strings.Contains(out, "prepared") {
		t.Fatalf("ca status: %d %s", code, out)
	}
	// The prepared root is published at once.
	b2, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("example.org"), []byte(w.get(t, "/bundle")))
	if err != nil || len(b2.X509Authorities()) != 2 {
		t.Fatalf("bundle after rotate-root: %v, %d authorities, want 2", err, len(b2.X509Authorities()))
	}

	out, code = w.writ(t, "cert", "list")
	if code != 0 || !strings.Contains(out, "spiffe://example.org/writ/control-plane") {
		t.Fatalf("cert list: %d %s", code, out)
	}

	// SIGTERM stops writd cleanly.
	if err := w.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-w.done:
		w.done <- err
		if err != nil {
			t.Fatalf("writd exited with %v after SIGTERM:\n%s", err, w.log)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("writd did not stop within 30 s of SIGTERM")
	}
	if !strings.Contains(w.log.String(), "writd stopped") {
		t.Fatalf("no clean-stop log line:\n%s", w.log)
	}
	_, code = w.writ(t, "whoami")
	if code != 1 {
		t.Fatalf("writ against a stopped writd exited %d, want 1", code)
	}
}

func TestWritdConfigErrors(t *testing.T) {
	bin := binDir(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "writ.yaml")
	if err := os.WriteFile(path, []byte("trust_domain: example.org\ndatabase_url: postgres://x/y\nca:\n  x509_svid_tll: 1h\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(bin, "writd"), "serve", "--config", path).CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 2 {
		t.Fatalf("writd with a bad config: %v\n%s", err, out)
	}
	if want := path + ":4: ca.x509_svid_tll: field x509_svid_tll not found"; !strings.Contains(string(out), want) {
		t.Fatalf("error does not name file, line and field (%q):\n%s", want, out)
	}
	out, err = exec.CommandContext(ctx, filepath.Join(bin, "writd"), "--help").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "writd serve --config") {
		t.Fatalf("writd --help: %v\n%s", err, out)
	}
}
