package test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/internal/syncbuf"
)

var enforcerID = spiffeid.RequireFromString("spiffe://example.org/ns/writ/sa/enforcer")

// enforcerProc is a writ-enforcer process started for one test.
type enforcerProc struct {
	cmd        *exec.Cmd
	log        *syncbuf.Buffer
	done       chan error
	listen     string
	admin      string
	decisionLg string
}

// startEnforcer runs writ-enforcer with args added to its listen, admin
// and decision-log flags and waits until it is ready.
func startEnforcer(t testing.TB, args ...string) *enforcerProc {
	t.Helper()
	return startEnforcerBin(t, filepath.Join(binDir(t), "writ-enforcer"), nil, args...)
}

// startEnforcerBin is startEnforcer with another writ-enforcer binary and
// environment variables added to this process's.
func startEnforcerBin(t testing.TB, bin string, env []string, args ...string) *enforcerProc {
	t.Helper()
	p := &enforcerProc{log: &syncbuf.Buffer{}, done: make(chan error, 1), listen: freeAddr(t), admin: freeAddr(t),
		decisionLg: filepath.Join(t.TempDir(), "decisions.jsonl")}
	args = append([]string{"--listen", p.listen, "--admin-addr", p.admin, "--decision-log", p.decisionLg}, args...)
	p.cmd = exec.Command(bin, args...)
	if len(env) > 0 {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if code, _ := p.get("/readyz"); code == http.StatusOK {
			return p
		}
		select {
		case err := <-p.done:
			t.Fatalf("writ-enforcer exited: %v\n%s", err, p.log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("writ-enforcer not ready\n%s", p.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *enforcerProc) get(path string) (int, string) {
	resp, err := http.Get("http://" + p.admin + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric reads one sample of the enforcer's /metrics, 0 if absent.
func (p *enforcerProc) metric(t *testing.T, name string) float64 {
	t.Helper()
	_, body := p.get("/metrics")
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// stop sends SIGTERM and returns the exit code.
func (p *enforcerProc) stop(t testing.TB) int {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		p.done <- err // for Cleanup
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(30 * time.Second):
		t.Fatalf("writ-enforcer did not stop on SIGTERM\n%s", p.log)
		return -1
	}
}

// meshPolicyDir is a copy of the shipped mesh policy allowing demo/client
// to call demo/server and nothing else.
func meshPolicyDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	rego, err := os.ReadFile(filepath.Join(repoRoot(t), "policies", "mesh", "mesh.rego"))
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "mesh.rego"), string(rego))
	write(t, filepath.Join(dir, "data.json"), `{"writ": {"mesh": {"allowed": [
		{"source": {"namespace": "demo", "service_account": "client"},
		 "destination": {"namespace": "demo", "service_account": "server"}}]}}}`)
	return dir
}

func write(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func checkReq(src, dst, method, path string) *authv3.CheckRequest {
	peer := func(id string, port uint32) *authv3.AttributeContext_Peer {
		return &authv3.AttributeContext_Peer{Principal: id, Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "127.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}}
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: peer(src, 40000), Destination: peer(dst, 8080),
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: "1", Method: method, Path: path, Host: "server.demo", Protocol: "HTTP/2",
			Headers: map[string]string{":method": method, ":path": path, ":authority": "server.demo"},
		}},
	}}
}

// enforcerEnv is an authority, an agent serving SVIDs for the enforcer
// and its client to this uid, and the client's X509 source.
func enforcerEnv(t testing.TB) (addr string, client *workloadapi.X509Source) {
	t.Helper()
	env := authoritytest.Start(t, authoritytest.Options{})
	ctx := context.Background()
	uid := fmt.Sprint(os.Geteuid())
	for _, id := range []spiffeid.ID{enforcerID, clientID} {
		if _, err := env.Registry.CreateEntry(ctx, authority.EntryInput{SPIFFEID: id.String(), ParentID: "spiffe://example.org/node/enf",
			Selectors: []string{"unix:uid:" + uid}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	addr = startAgent(t, env, "enf")
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(sctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)), pick(clientID))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return addr, src
}

// dialEnforcer connects over mTLS as the client workload, accepting only
// the enforcer's SVID.
func dialEnforcer(t testing.TB, src *workloadapi.X509Source, addr string) *grpc.ClientConn {
	t.Helper()
	cfg := svidtls.ClientConfig(src, src, svidtls.AuthorizeID(enforcerID), clockwork.NewRealClock())
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// TestEnforcerEndToEnd: writ-enforcer gets its SVID from a real agent, a
// real grpc-go ext_authz client with its own SVID gets the answers the
// policy gives, health is SERVING, a bad policy written while checks flow
// changes no answer and not readiness, and SIGTERM exits 0. Requests
// whose writ.authz_decision names several queries (several enforced
// AuthorizationPolicies) are allowed only if every one allows.
func TestEnforcerEndToEnd(t *testing.T) {
	wl, src := enforcerEnv(t)
	dir := meshPolicyDir(t)
	write(t, filepath.Join(dir, "hours.rego"), "package team.hours\n\ndefault open := false\n\nopen if input.attributes.request.http.method == \"GET\"\n")
	bound := func(req *authv3.CheckRequest, decisions string) *authv3.CheckRequest {
		req.Attributes.ContextExtensions = map[string]string{"writ.authz_mode": "enforce", "writ.authz_decision": decisions}
		return req
	}
	const both = "data.envoy.authz.allow,data.team.hours.open"
	p := startEnforcer(t, "--workload-api", wl, "--spiffe-id", enforcerID.String(), "--policy-dir", dir, "--poll-interval", "100ms")
	cc := dialEnforcer(t, src, p.listen)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	hc, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: authv3.Authorization_ServiceDesc.ServiceName})
	if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health %v, %v", hc, err)
	}

	client := authv3.NewAuthorizationClient(cc)
	intruder := "spiffe://example.org/ns/demo/sa/intruder"
	cases := []struct {
		name string
		req  *authv3.CheckRequest
		want code.Code
	}{
		{"allowed pair", checkReq(clientID.String(), serverID.String(), "GET", "/items/1"), code.Code_OK},
		{"other source", checkReq(intruder, serverID.String(), "GET", "/items/1"), code.Code_PERMISSION_DENIED},
		{"reverse direction", checkReq(serverID.String(), clientID.String(), "POST", "/"), code.Code_PERMISSION_DENIED},
		{"no peer identity", checkReq("", serverID.String(), "GET", "/"), code.Code_PERMISSION_DENIED},
		{"encoded slash", checkReq(clientID.String(), serverID.String(), "GET", "/a%2fb"), code.Code_INVALID_ARGUMENT},
		{"bound decisions all allow", bound(checkReq(clientID.String(), serverID.String(), "GET", "/items/1"), both), code.Code_OK},
		{"bound decision denies", bound(checkReq(clientID.String(), serverID.String(), "POST", "/items/1"), both), code.Code_PERMISSION_DENIED},
		{"other bound decision denies", bound(checkReq(intruder, serverID.String(), "GET", "/items/1"), both), code.Code_PERMISSION_DENIED},
		{"undefined bound decision", bound(checkReq(clientID.String(), serverID.String(), "GET", "/items/1"), "data.team.none.allow"), code.Code_PERMISSION_DENIED},
	}
	check := func(ctx context.Context, i int) error {
		c := cases[i]
		resp, err := client.Check(ctx, c.req)
		if err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
		if got := code.Code(resp.GetStatus().GetCode()); got != c.want {
			return fmt.Errorf("%s: status %v, want %v", c.name, got, c.want)
		}
		return nil
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := check(ctx, i); err != nil {
				t.Fatal(err)
			}
		})
	}

	t.Run("bad policy under load changes nothing", func(t *testing.T) {
		loadCtx, stopLoad := context.WithCancel(ctx)
		defer stopLoad()
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		var n atomic.Int64
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; loadCtx.Err() == nil; i++ {
					if err := check(loadCtx, i%len(cases)); err != nil {
						if loadCtx.Err() == nil {
							errs <- err
						}
						return
					}
					n.Add(1)
				}
			}()
		}
		// Checks flow before, during and after the bad policy's arrival.
		waitChecks := func(more int64) {
			t.Helper()
			target := n.Load() + more
			deadline := time.Now().Add(30 * time.Second)
			for n.Load() < target {
				if time.Now().After(deadline) {
					t.Fatalf("checks stalled at %d", n.Load())
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		waitChecks(200)
		before := p.metric(t, `writ_policy_reloads_total{outcome="rejected"}`)
		write(t, filepath.Join(dir, "broken.rego"), "package envoy.authz\n\nallow if {\n  input.x ==\n}\n")
		deadline := time.Now().Add(30 * time.Second)
		for p.metric(t, `writ_policy_reloads_total{outcome="rejected"}`) <= before {
			if time.Now().After(deadline) {
				t.Fatalf("bad policy never rejected\n%s", p.log)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if code, body := p.get("/readyz"); code != http.StatusOK || !strings.Contains(body, "broken.rego") {
			t.Errorf("readyz after a bad policy: %d %q, want 200 naming broken.rego", code, body)
		}
		waitChecks(200)
		stopLoad()
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if !strings.Contains(p.log.String(), "policy rejected") {
			t.Errorf("rejection not logged:\n%s", p.log)
		}
		for i := range cases {
			if err := check(ctx, i); err != nil {
				t.Errorf("after the bad policy: %v", err)
			}
		}
	})

	t.Run("decisions logged", func(t *testing.T) {
		bs, err := os.ReadFile(p.decisionLg)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(bs), `"source":"`+clientID.String()+`"`) || !strings.Contains(string(bs), `"result":"allow"`) {
			t.Fatalf("decision log lacks the allowed check:\n%.2000s", bs)
		}
	})

	if code := p.stop(t); code != 0 {
		t.Fatalf("exit code %d after SIGTERM\n%s", code, p.log)
	}
}

// TestEnforcerPullsBundleFromWritd: writd serves a policy directory as an
// OPA bundle; writ-enforcer pulls it by URL and answers by it, follows an
// edit, and keeps answering by the last good policy when the directory
// breaks (writd never serves the broken set).
func TestEnforcerPullsBundleFromWritd(t *testing.T) {
	dir := meshPolicyDir(t)
	w := startWritd(t, writdOptions{extra: fmt.Sprintf("policy:\n  dir: %s\n  bundle_name: mesh\n  poll_interval: 100ms\n  plain_http: true\n", dir)})
	wl, src := enforcerEnv(t)
	p := startEnforcer(t, "--workload-api", wl, "--spiffe-id", enforcerID.String(),
		"--bundle-url", "http://"+w.http+"/bundles/mesh", "--bundle-poll", "100ms")
	client := authv3.NewAuthorizationClient(dialEnforcer(t, src, p.listen))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	intruder := "spiffe://example.org/ns/demo/sa/intruder"
	answer := func(src string) code.Code {
		t.Helper()
		resp, err := client.Check(ctx, checkReq(src, serverID.String(), "GET", "/items/7"))
		if err != nil {
			t.Fatal(err)
		}
		return code.Code(resp.GetStatus().GetCode())
	}
	if got := answer(clientID.String()); got != code.Code_OK {
		t.Fatalf("client: %v, want OK", got)
	}
	if got := answer(intruder); got != code.Code_PERMISSION_DENIED {
		t.Fatalf("intruder: %v, want PERMISSION_DENIED", got)
	}

	// Edit: the intruder is now allowed, once writd rebuilt and the
	// enforcer polled.
	write(t, filepath.Join(dir, "data.json"), `{"writ": {"mesh": {"allowed": [
		{"source": {"namespace": "demo", "service_account": "*"},
		 "destination": {"namespace": "demo", "service_account": "server"}}]}}}`)
	deadline := time.Now().Add(30 * time.Second)
	for answer(intruder) != code.Code_OK {
		if time.Now().After(deadline) {
			t.Fatalf("the edit never reached the enforcer\nwritd:\n%s\nenforcer:\n%s", w.log, p.log)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A broken edit: writd refuses to build it and keeps serving the last
	// good bundle; answers stay.
	write(t, filepath.Join(dir, "broken.rego"), "package envoy.authz\n\nallow if {\n")
	deadline = time.Now().Add(30 * time.Second)
	for !strings.Contains(w.get(t, "/metrics"), `writ_policy_bundle_builds_total{outcome="rejected"} 1`) {
		if time.Now().After(deadline) {
			t.Fatalf("writd never rejected the broken edit\n%s", w.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := answer(intruder); got != code.Code_OK {
		t.Fatalf("after a broken edit: %v, want the last good policy's OK", got)
	}
	if code, _ := p.get("/readyz"); code != http.StatusOK {
		t.Fatalf("enforcer readyz %d after a broken edit upstream", code)
	}
	if code := p.stop(t); code != 0 {
		t.Fatalf("exit code %d after SIGTERM\n%s", code, p.log)
	}
}

// TestEnforcerPeerAuthorization: with --allow-spiffe-id, a client of the
// trust domain that is not listed gets no answer, and neither does a
// client without an SVID; a listed one does.
func TestEnforcerPeerAuthorization(t *testing.T) {
	wl, src := enforcerEnv(t)
	dir := meshPolicyDir(t)
	p := startEnforcer(t, "--workload-api", wl, "--spiffe-id", enforcerID.String(), "--policy-dir", dir,
		"--allow-spiffe-id", "spiffe://example.org/ns/demo/sa/envoy")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req := checkReq(clientID.String(), serverID.String(), "GET", "/")
	if _, err := authv3.NewAuthorizationClient(dialEnforcer(t, src, p.listen)).Check(ctx, req); err == nil {
		t.Fatal("a client not in --allow-spiffe-id got an answer")
	}
	anon := svidtls.ClientConfig(nil, src, svidtls.AuthorizeID(enforcerID), clockwork.NewRealClock())
	cc, err := grpc.NewClient(p.listen, grpc.WithTransportCredentials(credentials.NewTLS(anon)))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	if _, err := authv3.NewAuthorizationClient(cc).Check(ctx, req); err == nil {
		t.Fatal("a client without an SVID got an answer")
	}
	if bs, _ := os.ReadFile(p.decisionLg); len(bs) != 0 {
		t.Fatalf("refused clients produced decisions:\n%s", bs)
	}
	if code := p.stop(t); code != 0 {
		t.Fatalf("exit code %d after SIGTERM\n%s", code, p.log)
	}

	// The same client, listed, is answered.
	p = startEnforcer(t, "--workload-api", wl, "--spiffe-id", enforcerID.String(), "--policy-dir", dir,
		"--allow-spiffe-id", clientID.String())
	resp, err := authv3.NewAuthorizationClient(dialEnforcer(t, src, p.listen)).Check(ctx, req)
	if err != nil || code.Code(resp.GetStatus().GetCode()) != code.Code_OK {
		t.Fatalf("listed client: %v, %v", resp, err)
	}
}
