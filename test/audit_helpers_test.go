package test

import (
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
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/internal/syncbuf"
)

// pgCluster is a PostgreSQL cluster the test owns, so that it can stop and
// start it (scripts/pg.sh).
type pgCluster struct {
	dir, url, script string
}

func startPG(t *testing.T) *pgCluster {
	t.Helper()
	// Not t.TempDir: the postgres user must be able to reach the directory.
	dir, err := os.MkdirTemp("", "writ-audit-pg-")
	if err != nil {
		t.Fatal(err)
	}
	p := &pgCluster{dir: dir, script: filepath.Join(repoRoot(t), "scripts", "pg.sh")}
	out, err := exec.Command(p.script, "start", dir).Output()
	if err != nil {
		t.Fatalf("pg.sh start: %v", err)
	}
	p.url = strings.TrimSpace(string(out))
	t.Cleanup(func() {
		_ = exec.Command(p.script, "stop", dir).Run()
		os.RemoveAll(dir)
	})
	return p
}

func (p *pgCluster) stop(t *testing.T) {
	t.Helper()
	if out, err := exec.Command(p.script, "stop", p.dir).CombinedOutput(); err != nil {
		t.Fatalf("pg.sh stop: %v: %s", err, out)
	}
}

func (p *pgCluster) start(t *testing.T) {
	t.Helper()
	if out, err := exec.Command(p.script, "start", p.dir).CombinedOutput(); err != nil {
		t.Fatalf("pg.sh start: %v: %s", err, out)
	}
}

// auditWritd is a writd process on fixed addresses that the test can kill
// with SIGKILL and start again.
type auditWritd struct {
	bin, dir, cfg, http, grpc, socket string
	cmd                               *exec.Cmd
	done                              chan error
	log                               *syncbuf.Buffer
	starts                            int
}

func newAuditWritd(t *testing.T, dbURL string) *auditWritd {
	t.Helper()
	return newAuditWritdWith(t, dbURL, writdOptions{})
}

// newAuditWritdWith is newAuditWritd with a decision API listener and
// more configuration.
func newAuditWritdWith(t *testing.T, dbURL string, o writdOptions) *auditWritd {
	t.Helper()
	w := &auditWritd{bin: binDir(t), dir: t.TempDir(), http: freeAddr(t), grpc: freeAddr(t), log: &syncbuf.Buffer{}}
	w.socket = filepath.Join(w.dir, "admin", "admin.sock")
	kek, err := exec.Command(filepath.Join(w.bin, "writd"), "gen-kek").Output()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.dir, "kek"), kek, 0o600); err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("listen:\n  http: %s\n  grpc: %s\n", w.http, w.grpc)
	if o.listenDecision != "" {
		listen += fmt.Sprintf("  decision: %s\n", o.listenDecision)
	}
	cfg := fmt.Sprintf("trust_domain: example.org\ndatabase_url: %q\n%sadmin:\n  socket: %s\nca:\n  kek_file: %s\n",
		dbURL, listen, w.socket, filepath.Join(w.dir, "kek")) + o.extra
	w.cfg = filepath.Join(w.dir, "writ.yaml")
	if err := os.WriteFile(w.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if w.running() {
			_ = w.cmd.Process.Kill()
			<-w.done
		}
		if t.Failed() {
			t.Logf("writd log:\n%s", w.log)
		}
	})
	w.start(t)
	return w
}

func (w *auditWritd) running() bool {
	if w.cmd == nil {
		return false
	}
	select {
	case err := <-w.done:
		w.done <- err
		return false
	default:
		return true
	}
}

func (w *auditWritd) start(t *testing.T) {
	t.Helper()
	w.starts++
	fmt.Fprintf(w.log, "---- start %d\n", w.starts)
	w.cmd = exec.Command(filepath.Join(w.bin, "writd"), "serve", "--config", w.cfg)
	w.cmd.Stdout, w.cmd.Stderr = w.log, w.log
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.done = make(chan error, 1)
	go func(c *exec.Cmd, done chan error) { done <- c.Wait() }(w.cmd, w.done)
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + w.http + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if !w.running() || time.Now().After(deadline) {
			t.Fatalf("writd not ready: %v\n%s", err, w.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill9 kills writd with SIGKILL: no shutdown code runs.
func (w *auditWritd) kill9(t *testing.T) {
	t.Helper()
	if err := w.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-w.done
	w.done <- nil
}

func (w *auditWritd) writ(t *testing.T, args ...string) (string, int) {
	t.Helper()
	return runWrit(t, append([]string{"--admin-socket", w.socket}, args...)...)
}

func (w *auditWritd) bundle(t *testing.T) *spiffebundle.Bundle {
	t.Helper()
	resp, err := http.Get("http://" + w.http + "/bundle")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	bundle, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("example.org"), b)
	if err != nil {
		t.Fatalf("bundle: %v", err)
	}
	return bundle
}

// attest gets a node SVID from writd the way an agent does: a join token
// from the CLI, then Attest over TLS on the node API.
func (w *auditWritd) attest(t *testing.T, name string) *x509svid.SVID {
	t.Helper()
	out, code := w.writ(t, "token", "create", "--spiffe-id", "spiffe://example.org/node/"+name)
	if code != 0 {
		t.Fatalf("token create: %s", out)
	}
	var tok string
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "Token: "); ok {
			tok = strings.TrimSpace(v)
		}
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	cfg := tlsconfig.TLSClientConfig(w.bundle(t), tlsconfig.AuthorizeID(authority.ControlPlaneID(td)))
	conn, err := grpc.NewClient(w.grpc, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	key, csr := authoritytest.CSR(t, spiffeid.ID{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := nodeapi.NewNodeClient(conn).Attest(ctx, &nodeapi.AttestRequest{JoinToken: tok, Csr: csr})
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	return authoritytest.SVID(t, resp.GetSvid().GetCertChain(), key)
}

// dialCollector connects to writd's gRPC port presenting svid, as a
// shipper does.
func (w *auditWritd) dialCollector(t *testing.T, svid *x509svid.SVID) *grpc.ClientConn {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString("example.org")
	cfg := svidtls.ClientConfig(svid, w.bundle(t), svidtls.AuthorizeID(authority.ControlPlaneID(td)), nil)
	conn, err := grpc.NewClient(w.grpc, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// waitUntil polls cond; the limit guards against a hang and is not a
// timing assertion.
func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
