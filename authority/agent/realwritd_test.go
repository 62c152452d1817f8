package agent

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
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/store/pgtest"
)

// realWritd is writd's authority stack as writd wires it: the CA and the
// registry on a real PostgreSQL, the node API server with writd's own gRPC
// options and control-plane TLS identity, on a real TCP socket.
type realWritd struct {
	ca   *authority.CA
	reg  *authority.Registry
	addr string
	srv  *grpc.Server
	// bundleFile is the bootstrap bundle as served by writd's /bundle.
	bundleFile string
}

const realNodeID = "spiffe://example.org/node/n1"

// newRealWritd starts the stack on clk. The CA's and the control-plane
// identity's own Run loops are not started: their renewals are not what
// these tests are about, and the agent's loop must be the only sleeper on
// the fake clock for the tests to know when it has settled.
func newRealWritd(t *testing.T, clk clockwork.Clock) *realWritd {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	td := spiffeid.RequireTrustDomainFromString(testTD)
	pool := pgtest.NewMigrated(t)
	kek := make([]byte, 32)
	if _, err := rand.Read(kek); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ca, err := authority.NewCA(ctx, authority.Options{TrustDomain: td, Pool: pool, ReplicaID: "r1", KEK: kek, Clock: clk, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	reg := authority.NewRegistry(pool, td, clk)
	ident, err := authority.NewServerIdentity(ctx, ca, reg, td, clk, log)
	if err != nil {
		t.Fatal(err)
	}
	ns := authority.NewNodeServer(ca, reg, authority.NodeServerOptions{TrustDomain: td, Clock: clk, Log: log})
	srv := grpc.NewServer(authority.GRPCServerOptions(ident.TLSConfig())...)
	nodeapi.RegisterNodeServer(srv, ns)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(srv.Stop)

	// The bootstrap bundle, fetched from writd's /bundle handler.
	hs := httptest.NewServer(authority.BundleHandler(ca, log))
	defer hs.Close()
	resp, err := http.Get(hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /bundle: %d %v", resp.StatusCode, err)
	}
	bundleFile := filepath.Join(t.TempDir(), "bundle.json")
	if err := os.WriteFile(bundleFile, doc, 0o600); err != nil {
		t.Fatal(err)
	}
	return &realWritd{ca: ca, reg: reg, addr: l.Addr().String(), srv: srv, bundleFile: bundleFile}
}

// newRealEnv runs an agent against a real writd stack, with one entry for
// this test process.
func newRealEnv(t *testing.T) (*env, *realWritd, *authority.Entry) {
	t.Helper()
	clk := clockwork.NewFakeClockAt(time.Now())
	w := newRealWritd(t, clk)
	ctx := context.Background()
	tok, err := w.reg.CreateJoinToken(ctx, realNodeID, 10*time.Minute, "test")
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	entry, err := w.reg.CreateEntry(ctx, authority.EntryInput{SPIFFEID: webID, ParentID: realNodeID, Selectors: []string{"unix:uid:0", "unix:path:" + exe}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	boot, err := LoadTrustBundle(w.bundleFile, spiffeid.RequireTrustDomainFromString(testTD))
	if err != nil {
		t.Fatal(err)
	}
	e := startAgent(t, clk, w.addr, tok.Token, boot, nil)
	e.exe = exe
	e.settle()
	if !e.a.Ready() {
		t.Fatal("agent not ready against real writd")
	}
	if got := e.a.NodeID().String(); got != realNodeID {
		t.Fatalf("node id %s, want %s", got, realNodeID)
	}
	return e, w, entry
}

func TestRealWritdServesX509AndJWTSVIDs(t *testing.T) {
	e, w, _ := newRealEnv(t)
	c := e.client()
	svid, err := c.FetchX509SVID(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID.String() != webID {
		t.Fatalf("got %s, want %s", svid.ID, webID)
	}
	bundle, err := w.ca.Bundle(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		t.Fatalf("SVID does not verify against the CA's bundle: %v", err)
	}
	tok, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "svc-b"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.ParseAndValidate(tok.Marshal(), bundle, []string{"svc-b"}); err != nil {
		t.Fatalf("JWT-SVID does not validate against the CA's bundle: %v", err)
	}
	if got, err := c.ValidateJWTSVID(e.ctx, tok.Marshal(), "svc-b"); err != nil || got.ID.String() != webID {
		t.Fatalf("ValidateJWTSVID = %v, %v", got, err)
	}

	// Every issuance is in writd's log: node, X.509 and JWT SVIDs.
	iss, err := w.reg.ListIssuances(e.ctx, 100)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, is := range iss {
		if is.Outcome != authority.OutcomeRefused {
			kinds[is.Kind]++
		}
	}
	for _, k := range []string{authority.KindNodeSVID, authority.KindX509SVID, authority.KindJWTSVID} {
		if kinds[k] == 0 {
			t.Errorf("no %s issuance recorded: %v", k, kinds)
		}
	}
}

func TestRealWritdRotationAndEntryDeletion(t *testing.T) {
	e, w, entry := newRealEnv(t)
	c := e.client()
	wt := newWatcher()
	go c.WatchX509Context(e.ctx, wt)
	first := wt.next(t).DefaultSVID()
	node, err := w.reg.GetNode(e.ctx, spiffeid.RequireFromString(realNodeID))
	if err != nil {
		t.Fatal(err)
	}

	e.advance(31 * time.Minute) // past half of the CA's default 1h
	second := wt.next(t).DefaultSVID()
	if first.Certificates[0].SerialNumber.Cmp(second.Certificates[0].SerialNumber) == 0 {
		t.Fatal("no rotation pushed")
	}
	renewed, err := w.reg.GetNode(e.ctx, spiffeid.RequireFromString(realNodeID))
	if err != nil {
		t.Fatal(err)
	}
	if renewed.SVIDSerial == node.SVIDSerial {
		t.Fatal("node SVID not renewed at writd")
	}

	// The renewed node SVID still authenticates the next sync.
	if err := w.reg.DeleteEntry(e.ctx, entry.ID); err != nil {
		t.Fatal(err)
	}
	e.advance(30 * time.Second)
	if err := wt.nextErr(t); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("stream error %v, want PermissionDenied", err)
	}
}

func TestRealWritdDownServesCachedSVIDs(t *testing.T) {
	e, w, _ := newRealEnv(t)
	c := e.client()
	before, err := c.FetchX509SVID(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	w.srv.Stop()
	e.advance(31 * time.Minute)
	during, err := c.FetchX509SVID(e.ctx)
	if err != nil {
		t.Fatalf("cached SVID not served while writd is down: %v", err)
	}
	if before.Certificates[0].SerialNumber.Cmp(during.Certificates[0].SerialNumber) != 0 {
		t.Fatal("served a different SVID while writd was down")
	}
}

func TestRealWritdOtherUIDIsRefusedItsNeighboursSVID(t *testing.T) {
	e, w, _ := newRealEnv(t)
	child, run := nobodyClient(t, e)
	if _, err := w.reg.CreateEntry(e.ctx, authority.EntryInput{SPIFFEID: "spiffe://example.org/ns/default/sa/root-child", ParentID: realNodeID, Selectors: []string{"unix:uid:0", "unix:path:" + child}}, "test"); err != nil {
		t.Fatal(err)
	}
	e.advance(30 * time.Second)
	if res := run(); res.Code != codes.PermissionDenied.String() {
		t.Fatalf("uid 65534 got %+v, want PermissionDenied", res)
	}
	nobodyID := "spiffe://example.org/ns/default/sa/nobody"
	if _, err := w.reg.CreateEntry(e.ctx, authority.EntryInput{SPIFFEID: nobodyID, ParentID: realNodeID, Selectors: []string{"unix:uid:65534", "unix:path:" + child}}, "test"); err != nil {
		t.Fatal(err)
	}
	e.advance(30 * time.Second)
	if res := run(); res.Code != codes.OK.String() || len(res.IDs) != 1 || res.IDs[0] != nobodyID {
		t.Fatalf("uid 65534 got %+v, want exactly %s", res, nobodyID)
	}
}

// TestRealWritdRootRotationReachesWorkloads: when writd prepares a new
// root it publishes it in the bundle before using it; the agent must push
// that bundle to workloads at the next sync, so that peers already trust
// the new root when it starts signing.
func TestRealWritdRootRotationReachesWorkloads(t *testing.T) {
	e, w, _ := newRealEnv(t)
	c := e.client()
	wt := newWatcher()
	go c.WatchX509Context(e.ctx, wt)
	td := spiffeid.RequireTrustDomainFromString(testTD)
	first := wt.next(t)
	b1, err := first.Bundles.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	rot, err := w.ca.RotateRoot(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rot.Phase != authority.RotationPrepared {
		t.Fatalf("rotation phase %s, want prepared", rot.Phase)
	}
	e.advance(30 * time.Second)
	second := wt.next(t)
	b2, err := second.Bundles.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	if n1, n2 := len(b1.X509Authorities()), len(b2.X509Authorities()); n2 != n1+1 {
		t.Fatalf("bundle went from %d to %d X.509 authorities, want one more", n1, n2)
	}
	// The SVID in hand still verifies against the new bundle.
	if _, _, err := x509svid.Verify(second.DefaultSVID().Certificates, second.Bundles); err != nil {
		t.Fatalf("SVID no longer verifies after the bundle update: %v", err)
	}
}
