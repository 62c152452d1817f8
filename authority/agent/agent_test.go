package agent

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/writmesh/writ/authority/nodeapi"
)

// clientEnv switches the test binary into a Workload API client that
// prints what it was given; tests run it under another uid.
const clientEnv = "WRIT_AGENT_TEST_CLIENT_SOCKET"

func TestMain(m *testing.M) {
	if sock := os.Getenv(clientEnv); sock != "" {
		os.Exit(clientMode(sock))
	}
	os.Exit(m.Run())
}

// clientResult is what clientMode prints as JSON.
type clientResult struct {
	UID  int      `json:"uid"`
	IDs  []string `json:"ids"`
	Code string   `json:"code"`
	Err  string   `json:"err"`
}

func clientMode(sock string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res := clientResult{UID: os.Getuid(), Code: codes.OK.String()}
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+sock))
	if err == nil {
		var svids []*x509svid.SVID
		svids, err = c.FetchX509SVIDs(ctx)
		for _, s := range svids {
			res.IDs = append(res.IDs, s.ID.String())
		}
		c.Close()
	}
	if err != nil {
		res.Code, res.Err = status.Code(err).String(), err.Error()
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

// env is one agent wired to one fake writd on real sockets.
type env struct {
	t     testing.TB
	ctx   context.Context
	clk   *clockwork.FakeClock
	w     *fakeWritd
	a     *Agent
	sock  string
	exe   string
	errc  chan error
	extra []string // extra selectors for the default entry
}

const (
	webID   = "spiffe://example.org/ns/default/sa/web"
	tokenOK = "join-token-1"
)

func newEnv(t testing.TB, entries ...*nodeapi.Entry) *env {
	t.Helper()
	return newEnvCfg(t, nil, entries...)
}

// newEnvCfg is newEnv with a hook to adjust the agent's Config.
func newEnvCfg(t testing.TB, tweak func(*Config), entries ...*nodeapi.Entry) *env {
	t.Helper()
	return newEnvFull(t, tweak, false, entries...)
}

// newEnvFull can also start the agent while writd is down.
func newEnvFull(t testing.TB, tweak func(*Config), writdDown bool, entries ...*nodeapi.Entry) *env {
	t.Helper()
	clk := clockwork.NewFakeClockAt(time.Now())
	w := newFakeWritd(t, clk)
	w.newToken(tokenOK)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if entries == nil {
		entries = []*nodeapi.Entry{{Id: "e-web", SpiffeId: webID, Selectors: []string{"unix:uid:0", "unix:path:" + exe}}}
	}
	for _, e := range entries {
		w.putEntry(e)
	}

	// Only the root authority from writd's bundle, as a PEM bootstrap file
	// would give.
	boot := spiffebundle.FromX509Authorities(w.td, []*x509.Certificate{w.root})
	if writdDown {
		w.stop()
	}
	e := startAgent(t, clk, w.addr, tokenOK, boot, tweak)
	e.w, e.exe = w, exe
	e.settle()
	if e.a.Ready() == writdDown {
		t.Fatalf("agent ready = %v with writd down = %v", e.a.Ready(), writdDown)
	}
	return e
}

// startAgent runs an agent for the node API at addr with its Workload API
// on a fresh socket, until the test ends.
func startAgent(t testing.TB, clk *clockwork.FakeClock, addr, token string, boot *spiffebundle.Bundle, tweak func(*Config)) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	// A world-traversable directory: the socket must be reachable by any
	// local user; its subdirectory is created by the agent.
	dir, err := os.MkdirTemp("/tmp", "writ-agent-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var logw io.Writer = testWriter{t}
	if _, bench := t.(*testing.B); bench {
		logw = io.Discard
	}
	cfg := Config{
		ControlPlane: addr,
		JoinToken:    token,
		TrustDomain:  boot.TrustDomain(),
		TrustBundle:  boot,
		SyncInterval: 30 * time.Second,
		Clock:        clk,
		Jitter:       func(time.Duration) time.Duration { return 0 },
		Log:          slog.New(slog.NewTextHandler(logw, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	if tweak != nil {
		tweak(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, sock, err := ListenUnix("unix://" + filepath.Join(dir, "run", "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	errc := make(chan error, 2)
	go func() { errc <- a.Run(runCtx) }()
	go func() { errc <- a.Serve(runCtx, l) }()
	t.Cleanup(func() {
		stop()
		for range 2 {
			if err := <-errc; err != nil {
				t.Errorf("agent: %v", err)
			}
		}
	})
	return &env{t: t, ctx: ctx, clk: clk, a: a, sock: sock, errc: errc}
}

// settle waits until the agent's loop is asleep on the clock again, i.e.
// has finished reacting to the last clock move.
func (e *env) settle() {
	e.t.Helper()
	if err := e.clk.BlockUntilContext(e.ctx, 1); err != nil {
		e.t.Fatalf("agent loop did not settle: %v", err)
	}
}

// advance moves the fake clock and waits for the agent to react.
func (e *env) advance(d time.Duration) {
	e.t.Helper()
	e.clk.Advance(d)
	e.settle()
}

func (e *env) client() *workloadapi.Client {
	e.t.Helper()
	c, err := workloadapi.New(e.ctx, workloadapi.WithAddr("unix://"+e.sock))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func wantCode(t *testing.T, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("got code %v (err %v), want %v", got, err, want)
	}
}

func TestFetchX509AndJWTSVIDWithGoSpiffe(t *testing.T) {
	e := newEnv(t)
	c := e.client()

	svid, err := c.FetchX509SVID(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := svid.ID.String(); got != webID {
		t.Fatalf("got id %s, want %s", got, webID)
	}
	bundles, err := c.FetchX509Bundles(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundles); err != nil {
		t.Fatalf("SVID does not verify against the served bundle: %v", err)
	}
	if pub, ok := svid.Certificates[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(svid.PrivateKey.Public()) {
		t.Fatal("served key does not match the served certificate")
	}

	jwt, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "svc-b"})
	if err != nil {
		t.Fatal(err)
	}
	if got := jwt.ID.String(); got != webID {
		t.Fatalf("JWT-SVID id %s, want %s", got, webID)
	}
	jb, err := c.FetchJWTBundles(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.ParseAndValidate(jwt.Marshal(), jb, []string{"svc-b"}); err != nil {
		t.Fatalf("JWT-SVID does not validate against the served JWT bundle: %v", err)
	}
	got, err := c.ValidateJWTSVID(e.ctx, jwt.Marshal(), "svc-b")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID.String() != webID {
		t.Fatalf("validated id %s, want %s", got.ID, webID)
	}
	_, err = c.ValidateJWTSVID(e.ctx, jwt.Marshal(), "other-audience")
	wantCode(t, err, codes.InvalidArgument)

	// A second fetch for the same audience is served from the cache.
	mints := e.w.count("MintJWTSVID")
	if _, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "svc-b"}); err != nil {
		t.Fatal(err)
	}
	if got := e.w.count("MintJWTSVID"); got != mints {
		t.Fatalf("got %d mints, want %d (cached)", got, mints)
	}

	// Asking for an identity the workload is not entitled to.
	_, err = c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "svc-b", Subject: spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/db")})
	wantCode(t, err, codes.PermissionDenied)
}

func TestRotationIsPushedOnTheStream(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	w := newWatcher()
	go c.WatchX509Context(e.ctx, w)
	first := w.next(t)
	renewals := e.w.count("RenewNode")

	e.advance(31 * time.Minute) // past half of the 1h lifetime

	second := w.next(t)
	s1, s2 := first.DefaultSVID(), second.DefaultSVID()
	if s1.ID != s2.ID {
		t.Fatalf("id changed from %s to %s", s1.ID, s2.ID)
	}
	if s1.Certificates[0].SerialNumber.Cmp(s2.Certificates[0].SerialNumber) == 0 {
		t.Fatal("rotation pushed the same certificate")
	}
	if !s2.Certificates[0].NotAfter.After(s1.Certificates[0].NotAfter) {
		t.Fatal("rotated certificate does not live longer")
	}
	if got := e.w.count("RenewNode"); got != renewals+1 {
		t.Fatalf("node renewals: got %d, want %d", got, renewals+1)
	}
}

func TestNoMatchingEntryIsPermissionDenied(t *testing.T) {
	e := newEnv(t, &nodeapi.Entry{Id: "e-other", SpiffeId: "spiffe://example.org/ns/default/sa/other", Selectors: []string{"unix:uid:4242"}})
	c := e.client()
	_, err := c.FetchX509SVID(e.ctx)
	wantCode(t, err, codes.PermissionDenied)
	_, err = c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "x"})
	wantCode(t, err, codes.PermissionDenied)
	_, err = c.FetchX509Bundles(e.ctx)
	wantCode(t, err, codes.PermissionDenied)
	_, err = c.FetchJWTBundles(e.ctx)
	wantCode(t, err, codes.PermissionDenied)
}

func TestSecurityHeaderAndBadInput(t *testing.T) {
	e := newEnv(t)
	cc, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	wl := workload.NewSpiffeWorkloadAPIClient(cc)

	stream, err := wl.FetchX509SVID(e.ctx, &workload.X509SVIDRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	wantCode(t, err, codes.InvalidArgument)
	if !strings.Contains(err.Error(), "security header") {
		t.Fatalf("error %q does not name the missing header", err)
	}
	_, err = wl.FetchJWTSVID(e.ctx, &workload.JWTSVIDRequest{Audience: []string{"a"}})
	wantCode(t, err, codes.InvalidArgument)
	ctx := metadata.AppendToOutgoingContext(e.ctx, "workload.spiffe.io", "false")
	_, err = wl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"a"}})
	wantCode(t, err, codes.InvalidArgument)

	ctx = metadata.AppendToOutgoingContext(e.ctx, "workload.spiffe.io", "true")
	tests := []struct {
		name string
		call func() error
	}{
		{"no audience", func() error {
			_, err := wl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{})
			return err
		}},
		{"empty audience", func() error {
			_, err := wl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{""}})
			return err
		}},
		{"bad spiffe id", func() error {
			_, err := wl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: "not-an-id"})
			return err
		}},
		{"validate without audience", func() error {
			_, err := wl.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Svid: "x.y.z"})
			return err
		}},
		{"validate without token", func() error {
			_, err := wl.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "a"})
			return err
		}},
		{"validate garbage", func() error {
			_, err := wl.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: "x.y.z"})
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { wantCode(t, tt.call(), codes.InvalidArgument) })
	}
}

func TestCachedSVIDsServedWhileControlPlaneDown(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	before, err := c.FetchX509SVID(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	e.w.stop()
	e.advance(31 * time.Minute) // renewal is due and fails
	during, err := c.FetchX509SVID(e.ctx)
	if err != nil {
		t.Fatalf("cached SVID not served while writd is down: %v", err)
	}
	if before.Certificates[0].SerialNumber.Cmp(during.Certificates[0].SerialNumber) != 0 {
		t.Fatal("served a different SVID while writd was down")
	}

	// writd comes back: the next retry renews.
	e.w.restart(t)
	e.advance(maxBackoff + time.Minute)
	after, err := c.FetchX509SVID(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after.Certificates[0].SerialNumber.Cmp(before.Certificates[0].SerialNumber) == 0 {
		t.Fatal("SVID not renewed after writd came back")
	}
}

func TestExpiredSVIDsAreNotServed(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	if _, err := c.FetchX509SVID(e.ctx); err != nil {
		t.Fatal(err)
	}
	e.w.stop()
	for range 40 { // ~61 minutes in steps the retry timers follow
		e.advance(maxBackoff)
	}
	_, err := c.FetchX509SVID(e.ctx)
	wantCode(t, err, codes.Unavailable)
}

func TestEntryChangesAtWritdReachWorkloads(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	w := newWatcher()
	go c.WatchX509Context(e.ctx, w)
	w.next(t)

	// A new entry for the same workload appears on the stream.
	e.w.putEntry(&nodeapi.Entry{Id: "e-web2", SpiffeId: "spiffe://example.org/ns/default/sa/web2", Selectors: []string{"unix:uid:0"}})
	e.advance(30 * time.Second)
	got := w.next(t)
	if len(got.SVIDs) != 2 {
		t.Fatalf("got %d SVIDs after adding an entry, want 2", len(got.SVIDs))
	}

	// Both removed: the stream ends with PermissionDenied and fetches fail.
	e.w.removeEntry("e-web")
	e.w.removeEntry("e-web2")
	e.advance(30 * time.Second)
	if err := w.nextErr(t); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("stream error %v, want PermissionDenied", err)
	}
	_, err := c.FetchX509SVID(e.ctx)
	wantCode(t, err, codes.PermissionDenied)
}

func TestOtherUIDIsRefusedItsNeighboursSVID(t *testing.T) {
	e := newEnv(t)
	child, run := nobodyClient(t, e)

	// Root's entry for this very binary: only the uid tells them apart.
	e.w.putEntry(&nodeapi.Entry{Id: "e-root-child", SpiffeId: "spiffe://example.org/ns/default/sa/root-child", Selectors: []string{"unix:uid:0", "unix:path:" + child}})
	e.advance(30 * time.Second)

	// Only root's entry exists: nobody gets nothing.
	if res := run(); res.Code != codes.PermissionDenied.String() {
		t.Fatalf("uid 65534 got %+v, want PermissionDenied", res)
	}

	// An entry for uid 65534 running this binary is served to it, and
	// root's is still not.
	nobodyID := "spiffe://example.org/ns/default/sa/nobody"
	e.w.putEntry(&nodeapi.Entry{Id: "e-nobody", SpiffeId: nobodyID, Selectors: []string{"unix:uid:65534", "unix:path:" + child}})
	// The same uid from another binary must not match.
	e.w.putEntry(&nodeapi.Entry{Id: "e-nobody-other", SpiffeId: "spiffe://example.org/ns/default/sa/nobody-other", Selectors: []string{"unix:uid:65534", "unix:path:/usr/bin/other"}})
	e.advance(30 * time.Second)
	res := run()
	if res.Code != codes.OK.String() || len(res.IDs) != 1 || res.IDs[0] != nobodyID {
		t.Fatalf("uid 65534 got %+v, want exactly %s", res, nobodyID)
	}
}

// nobodyClient copies the test binary where uid 65534 can run it and
// returns its path and a function that runs it in client mode as
// 65534:65534 against e's socket.
func nobodyClient(t *testing.T, e *env) (string, func() clientResult) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("this test switches uid and must run as root (CI and sessions do)")
	}
	// The child binary must be readable by nobody: copy it to a
	// world-readable place. Its path is a selector in the tests.
	dir, err := os.MkdirTemp("/tmp", "writ-agent-child-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	child := filepath.Join(dir, "agent.test")
	copyFile(t, e.exe, child)
	return child, func() clientResult {
		cmd := exec.CommandContext(e.ctx, child)
		cmd.Env = []string{clientEnv + "=" + e.sock}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("child: %v", err)
		}
		var res clientResult
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("child output %q: %v", out, err)
		}
		if res.UID != 65534 {
			t.Fatalf("child ran as uid %d", res.UID)
		}
		return res
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// watcher collects go-spiffe X.509 context updates and errors.
type watcher struct {
	updates chan *workloadapi.X509Context
	errs    chan error
}

func newWatcher() *watcher {
	return &watcher{updates: make(chan *workloadapi.X509Context, 16), errs: make(chan error, 16)}
}

func (w *watcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w.updates <- c }
func (w *watcher) OnX509ContextWatchError(err error) {
	select {
	case w.errs <- err:
	default:
	}
}

func (w *watcher) next(t *testing.T) *workloadapi.X509Context {
	t.Helper()
	select {
	case c := <-w.updates:
		return c
	case err := <-w.errs:
		t.Fatalf("watch error: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no X.509 context update")
	}
	return nil
}

func (w *watcher) nextErr(t *testing.T) error {
	t.Helper()
	select {
	case c := <-w.updates:
		t.Fatalf("got update with %d SVIDs, want an error", len(c.SVIDs))
	case err := <-w.errs:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("no watch error")
	}
	return nil
}

func TestBundleChangeIsPushed(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	w := newWatcher()
	go c.WatchX509Context(e.ctx, w)
	first := w.next(t)
	td := spiffeid.RequireTrustDomainFromString(testTD)
	b1, err := first.Bundles.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}

	// writd adds a second root (a CA rotation starting) with a new sequence.
	k := mustKey(t)
	second := e.w.sign(t, spiffeid.RequireFromString("spiffe://example.org"), k.Public(), time.Hour)
	e.w.mu.Lock()
	e.w.bundle.AddX509Authority(second)
	if err := e.w.bundle.AddJWTAuthority("k2", k.Public()); err != nil {
		t.Fatal(err)
	}
	e.w.seq = 2
	e.w.mu.Unlock()
	e.advance(30 * time.Second)

	got := w.next(t)
	b2, err := got.Bundles.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	if n1, n2 := len(b1.X509Authorities()), len(b2.X509Authorities()); n1 != 1 || n2 != 2 {
		t.Fatalf("bundle authorities went from %d to %d, want 1 to 2", n1, n2)
	}
	jb, err := c.FetchJWTBundles(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, err := jb.GetJWTBundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	if !b.HasJWTAuthority("k2") {
		t.Fatal("new JWT authority not served")
	}
}

// TestSVIDsWorkForMTLS uses go-spiffe's X509Source on both ends of a real
// TLS connection: the served chain, key and bundle fit together.
func TestSVIDsWorkForMTLS(t *testing.T) {
	e := newEnv(t)
	src, err := workloadapi.NewX509Source(e.ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+e.sock)))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	web := spiffeid.RequireFromString(webID)
	l, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeID(web)))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.Write([]byte("hi"))
	}()
	conn, err := tls.Dial("tcp", l.Addr().String(), tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeID(web)))
	if err != nil {
		t.Fatalf("mTLS with served SVIDs: %v", err)
	}
	defer conn.Close()
	buf := make([]byte, 2)
	if _, err := io.ReadFull(conn, buf); err != nil {
		t.Fatal(err)
	}
	id, err := x509svid.IDFromCert(conn.ConnectionState().PeerCertificates[0])
	if err != nil || id != web {
		t.Fatalf("peer id %v (%v), want %s", id, err, web)
	}
}

func TestJWTMintingIsRateLimited(t *testing.T) {
	e := newEnvCfg(t, func(c *Config) { c.JWTMintRate, c.JWTMintBurst = 1, 2 })
	c := e.client()
	for _, aud := range []string{"a1", "a2"} {
		if _, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: aud}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "a3"})
	wantCode(t, err, codes.ResourceExhausted)
	// Cached tokens are still served while the limit holds.
	if _, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "a1"}); err != nil {
		t.Fatalf("cached token refused: %v", err)
	}
	e.advance(2 * time.Second)
	if _, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "a3"}); err != nil {
		t.Fatalf("after the limiter refilled: %v", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString(testTD)
	other := spiffeid.RequireTrustDomainFromString("other.org")
	w := newFakeWritd(t, clockwork.NewFakeClock())
	good := spiffebundle.FromX509Authorities(td, []*x509.Certificate{w.root})
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{"no control plane", Config{JoinToken: "t", TrustDomain: td, TrustBundle: good}, "control plane"},
		{"no token", Config{ControlPlane: "x:1", TrustDomain: td, TrustBundle: good}, "join token"},
		{"no trust domain", Config{ControlPlane: "x:1", JoinToken: "t", TrustBundle: good}, "trust domain"},
		{"no bundle", Config{ControlPlane: "x:1", JoinToken: "t", TrustDomain: td}, "trust bundle"},
		{"empty bundle", Config{ControlPlane: "x:1", JoinToken: "t", TrustDomain: td, TrustBundle: spiffebundle.New(td)}, "X.509 authority"},
		{"bundle of another domain", Config{ControlPlane: "x:1", JoinToken: "t", TrustDomain: other, TrustBundle: good}, "trust bundle is for"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("got %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestUsedJoinTokenStopsTheAgent: a refused attestation is final, and Run
// says why instead of retrying forever.
func TestUsedJoinTokenStopsTheAgent(t *testing.T) {
	clk := clockwork.NewFakeClockAt(time.Now())
	w := newFakeWritd(t, clk)
	a, err := New(Config{
		ControlPlane: w.addr, JoinToken: "never-issued", TrustDomain: w.td,
		TrustBundle: spiffebundle.FromX509Authorities(w.td, []*x509.Certificate{w.root}), Clock: clk,
	})
	if err != nil {
		t.Fatal(err)
	}
	err = a.Run(context.Background())
	if status.Code(errors.Unwrap(err)) != codes.PermissionDenied || !strings.Contains(err.Error(), "attest node") {
		t.Fatalf("Run = %v, want an attest error with PermissionDenied", err)
	}
	if a.Ready() {
		t.Fatal("ready without attestation")
	}
}

// TestWrongControlPlaneIdentityIsRefused: writd's certificate must carry
// spiffe://<td>/writ/control-plane; any other SVID of the domain is not
// trusted with the join token.
func TestWrongControlPlaneIdentityIsRefused(t *testing.T) {
	clk := clockwork.NewFakeClockAt(time.Now())
	w := newFakeWritd(t, clk)
	k := mustKey(t)
	impostor := spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web")
	cert := w.sign(t, impostor, k.Public(), time.Hour)
	w.stop()
	w.tlsCfg.Certificates = nil
	w.tlsCfg.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		return &tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: k, Leaf: cert}, nil
	}
	w.restart(t)
	w.newToken(tokenOK)
	a, err := New(Config{
		ControlPlane: w.addr, JoinToken: tokenOK, TrustDomain: w.td,
		TrustBundle: spiffebundle.FromX509Authorities(w.td, []*x509.Certificate{w.root}), Clock: clk,
		Jitter: func(time.Duration) time.Duration { return 0 },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	// The handshake fails (Unavailable), so the agent backs off on the
	// clock: once it waits there, the token must still be unused.
	if err := clk.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	cancel()
	<-done
	if got := w.count("Attest"); got != 0 {
		t.Fatalf("the join token reached an impostor: %d Attest calls", got)
	}
}

// TestWorkloadWaitsForTheFirstSync: a workload that asks before the agent
// has heard from writd is told to wait (stream) or retry (unary), not
// refused, and gets its SVID once writd answers.
func TestWorkloadWaitsForTheFirstSync(t *testing.T) {
	e := newEnvFull(t, nil, true)
	c := e.client()
	_, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "a"})
	wantCode(t, err, codes.Unavailable)

	w := newWatcher()
	go c.WatchX509Context(e.ctx, w)
	e.w.restart(t)
	e.advance(maxBackoff + time.Minute) // past the attestation retry
	got := w.next(t)
	if id := got.DefaultSVID().ID.String(); id != webID {
		t.Fatalf("got %s, want %s", id, webID)
	}
	if !e.a.Ready() {
		t.Fatal("not ready after attesting")
	}
}

// TestCachedJWTServedWhileControlPlaneDown: past its renewal point but
// before expiry, a cached JWT-SVID is still handed out when writd cannot
// mint a new one; once expired, the caller is told writd is unavailable.
func TestCachedJWTServedWhileControlPlaneDown(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	p := jwtsvid.Params{Audience: "svc-b"}
	before, err := c.FetchJWTSVID(e.ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	e.w.stop()
	e.advance(3 * time.Minute) // past half of the fake's 5 minute JWT lifetime
	during, err := c.FetchJWTSVID(e.ctx, p)
	if err != nil {
		t.Fatalf("cached JWT-SVID not served while writd is down: %v", err)
	}
	if during.Marshal() != before.Marshal() {
		t.Fatal("a different token while writd was down")
	}
	e.advance(3 * time.Minute) // now expired
	_, err = c.FetchJWTSVID(e.ctx, p)
	wantCode(t, err, codes.Unavailable)
}

// TestJWTForEntryWritdDropped: writd refuses to mint for an entry it has
// deleted even before the agent's next sync, and the workload is told it
// has no identity rather than that writd is down.
func TestJWTForEntryWritdDropped(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	e.w.removeEntry("e-web")
	_, err := c.FetchJWTSVID(e.ctx, jwtsvid.Params{Audience: "svc-b"})
	wantCode(t, err, codes.PermissionDenied)
}

// TestEntryReplacedInOneSync: an entry swapped for another in one sync
// moves the open stream to the new identity without an error.
func TestEntryReplacedInOneSync(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	w := newWatcher()
	go c.WatchX509Context(e.ctx, w)
	w.next(t)
	e.w.removeEntry("e-web")
	e.w.putEntry(&nodeapi.Entry{Id: "e-web-v2", SpiffeId: "spiffe://example.org/ns/default/sa/web-v2", Selectors: []string{"unix:uid:0"}})
	e.advance(30 * time.Second)
	got := w.next(t)
	if len(got.SVIDs) != 1 || got.SVIDs[0].ID.String() != "spiffe://example.org/ns/default/sa/web-v2" {
		t.Fatalf("got %d SVIDs (first %v), want only web-v2", len(got.SVIDs), got.DefaultSVID().ID)
	}
}
