package main

import (
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/internal/syncbuf"
	"github.com/writmesh/writ/store/pgtest"
)

// TestAgainstRealWritd runs writ-proxy as a user would, against writd's
// authority stack (CA and registry on PostgreSQL, node API server with
// writd's TLS identity), and fetches identities with go-spiffe's client.
func TestAgainstRealWritd(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	td := spiffeid.RequireTrustDomainFromString("example.org")
	pool := pgtest.NewMigrated(t)
	kek := make([]byte, 32)
	rand.Read(kek)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ca, err := authority.NewCA(ctx, authority.Options{TrustDomain: td, Pool: pool, ReplicaID: "r1", KEK: kek, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	reg := authority.NewRegistry(pool, td, nil)
	ident, err := authority.NewServerIdentity(ctx, ca, reg, td, nil, log)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(authority.GRPCServerOptions(ident.TLSConfig())...)
	nodeapi.RegisterNodeServer(srv, authority.NewNodeServer(ca, reg, authority.NodeServerOptions{TrustDomain: td, Log: log}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	defer srv.Stop()

	// The operator's steps: save writd's /bundle, make a join token and an
	// entry for the workload.
	hs := httptest.NewServer(authority.BundleHandler(ca, log))
	defer hs.Close()
	resp, err := http.Get(hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	doc, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	bundleFile := filepath.Join(t.TempDir(), "bundle.json")
	if err := os.WriteFile(bundleFile, doc, 0o600); err != nil {
		t.Fatal(err)
	}
	const nodeID = "spiffe://example.org/node/e2e"
	tok, err := reg.CreateJoinToken(ctx, nodeID, 10*time.Minute, "test")
	if err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Executable()
	const webID = "spiffe://example.org/ns/default/sa/web"
	if _, err := reg.CreateEntry(ctx, authority.EntryInput{SPIFFEID: webID, ParentID: nodeID, Selectors: []string{"unix:uid:" + strconv.Itoa(os.Getuid()), "unix:path:" + exe}}, "test"); err != nil {
		t.Fatal(err)
	}

	t.Setenv("WRIT_JOIN_TOKEN", tok.Token)
	adminAddr := freeAddr(t)
	sock := filepath.Join(t.TempDir(), "agent.sock")
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var stderr syncbuf.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(runCtx, []string{
			"--control-plane", l.Addr().String(),
			"--trust-bundle", bundleFile,
			"--trust-domain", "example.org",
			"--workload-api", "unix://" + sock,
			"--admin-addr", adminAddr,
		}, io.Discard, &stderr)
	}()
	waitHTTP(t, "http://"+adminAddr+"/readyz", http.StatusOK)

	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+sock))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	svid, err := c.FetchX509SVID(ctx)
	if err != nil {
		t.Fatalf("FetchX509SVID: %v\n%s", err, stderr.String())
	}
	if svid.ID.String() != webID {
		t.Fatalf("got %s, want %s", svid.ID, webID)
	}
	jwt, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "svc-b"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ValidateJWTSVID(ctx, jwt.Marshal(), "svc-b"); err != nil {
		t.Fatal(err)
	}

	stop()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit code %d; stderr: %s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("writ-proxy did not stop")
	}
}
