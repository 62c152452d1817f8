package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/agent"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/svidtls"
)

var (
	serverID = spiffeid.RequireFromString("spiffe://example.org/ns/demo/sa/server")
	clientID = spiffeid.RequireFromString("spiffe://example.org/ns/demo/sa/client")
)

// startAgent runs a real node agent against env and returns its Workload
// API address.
func startAgent(t testing.TB, env *authoritytest.Env, node string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tok, err := env.Registry.CreateJoinToken(ctx, "spiffe://example.org/node/"+node, 10*time.Minute, "test")
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(agent.Config{
		ControlPlane: env.Addr, JoinToken: tok.Token, TrustDomain: authoritytest.TrustDomain,
		TrustBundle: env.Bundle(t), SyncInterval: 20 * time.Second, Clock: env.Clock,
		Jitter: func(time.Duration) time.Duration { return 0 },
	})
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "writ-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	addr := "unix://" + filepath.Join(dir, "agent.sock")
	l, _, err := agent.ListenUnix(addr)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{}, 2)
	go func() { _ = a.Run(ctx); done <- struct{}{} }()
	go func() { _ = a.Serve(ctx, l); done <- struct{}{} }()
	t.Cleanup(func() {
		cancel()
		<-done
		<-done
		os.RemoveAll(dir)
	})
	return addr
}

// pick chooses one of several SVIDs served to the same process.
func pick(id spiffeid.ID) workloadapi.X509SourceOption {
	return workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
		for _, s := range svids {
			if s.ID == id {
				return s
			}
		}
		return svids[0]
	})
}

// TestHandshakesSurviveRotations: a TLS server and client holding SVIDs
// from a real agent keep handshaking while time moves through three SVID
// rotations and a full root rotation. Both sides verify certificates at
// the injected time against the bundle their agent serves.
func TestHandshakesSurviveRotations(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	ctx := context.Background()
	uid := fmt.Sprint(os.Geteuid())
	for _, id := range []spiffeid.ID{serverID, clientID} {
		if _, err := env.Registry.CreateEntry(ctx, authority.EntryInput{SPIFFEID: id.String(), ParentID: "spiffe://example.org/node/e2e",
			Selectors: []string{"unix:uid:" + uid}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	addr := startAgent(t, env, "e2e")
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	opts := func(id spiffeid.ID) []workloadapi.X509SourceOption {
		return []workloadapi.X509SourceOption{workloadapi.WithClientOptions(workloadapi.WithAddr(addr)), pick(id)}
	}
	srvSrc, err := workloadapi.NewX509Source(sctx, opts(serverID)...)
	if err != nil {
		t.Fatal(err)
	}
	defer srvSrc.Close()
	cliSrc, err := workloadapi.NewX509Source(sctx, opts(clientID)...)
	if err != nil {
		t.Fatal(err)
	}
	defer cliSrc.Close()

	l, err := tls.Listen("tcp", "127.0.0.1:0", svidtls.ServerConfig(srvSrc, srvSrc, svidtls.AuthorizeID(clientID), env.Clock))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				if err == nil {
					fmt.Fprintf(c, "echo %s", line)
				}
			}()
		}
	}()
	cliCfg := svidtls.ClientConfig(cliSrc, cliSrc, svidtls.AuthorizeID(serverID), env.Clock)
	handshake := func(step string) {
		t.Helper()
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", l.Addr().String(), cliCfg)
		if err != nil {
			t.Fatalf("%s: handshake failed: %v", step, err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "hello\n")
		got, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || got != "echo hello\n" {
			t.Fatalf("%s: exchange: %q %v", step, got, err)
		}
	}

	svid := func(src *workloadapi.X509Source) *x509svid.SVID {
		s, err := src.GetX509SVID()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	authorities := func(src *workloadapi.X509Source) []*x509.Certificate {
		b, err := src.GetX509BundleForTrustDomain(authoritytest.TrustDomain)
		if err != nil {
			t.Fatal(err)
		}
		return b.X509Authorities()
	}
	sameCerts := func(a, b []*x509.Certificate) bool {
		return len(a) == len(b) && !slices.ContainsFunc(a, func(c *x509.Certificate) bool {
			return !slices.ContainsFunc(b, func(d *x509.Certificate) bool { return c.Equal(d) })
		})
	}
	// settle lets the agent do what the moved clock asks of it: no SVID
	// overdue for renewal, the CA's current bundle served. The agent acts
	// on its own timers, so while it lags the clock creeps on in 5 s
	// steps, as time would pass for a real agent; it must catch up within
	// a minute.
	settle := func(step string) {
		t.Helper()
		var why string
		for i := 0; ; i++ {
			now := env.Clock.Now()
			caAuth := env.Bundle(t).X509Authorities()
			why = ""
			for _, src := range []*workloadapi.X509Source{srvSrc, cliSrc} {
				leaf := svid(src).Certificates[0]
				life := leaf.NotAfter.Sub(leaf.NotBefore)
				switch {
				case leaf.NotAfter.Sub(now) < life/2-2*time.Minute:
					why = "an SVID is overdue for renewal"
				case !sameCerts(authorities(src), caAuth):
					why = "the served bundle differs from the CA's"
				}
			}
			if why == "" {
				return
			}
			if i >= 12*20 {
				t.Fatalf("%s: the agent did not catch up with the clock within a minute: %s", step, why)
			}
			time.Sleep(5 * time.Millisecond)
			if i%20 == 19 {
				env.Clock.Advance(5 * time.Second)
			}
		}
	}

	const step = time.Minute
	serials := map[string]bool{}
	advance := func(phase string, n int) {
		for i := range n {
			env.Clock.Advance(step)
			name := fmt.Sprintf("%s, minute %d", phase, i+1)
			settle(name)
			handshake(name)
			leaf := svid(srvSrc).Certificates[0]
			if !serials[leaf.SerialNumber.String()] {
				t.Logf("%s: server SVID %s valid %s to %s", name, leaf.SerialNumber.Text(16)[:8], leaf.NotBefore.Format("15:04:05"), leaf.NotAfter.Format("15:04:05"))
			}
			serials[leaf.SerialNumber.String()] = true
		}
	}
	handshake("start")
	serials[svid(srvSrc).Certificates[0].SerialNumber.String()] = true
	firstRoot := env.CA.Roots()

	// Three SVID rotations: renewal at half of a one-hour life.
	advance("svid rotations", 100)
	if len(serials) < 4 {
		t.Fatalf("server SVID rotated %d times in 100 minutes, want at least 3", len(serials)-1)
	}

	// A root rotation, run to completion by the CA on the moving clock.
	st, err := env.CA.RotateRoot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; st.Phase != authority.RotationDone; i++ {
		if i > 240 {
			t.Fatalf("root rotation still %s after four hours", st.Phase)
		}
		advance("root rotation ("+string(st.Phase)+")", 1)
		if st, err = env.CA.RootRotationStatus(ctx); err != nil {
			t.Fatal(err)
		}
	}
	advance("after root rotation", 35)

	// Both sides now hold SVIDs that chain to the new root only.
	if len(firstRoot) != 1 {
		t.Fatalf("roots at start = %d", len(firstRoot))
	}
	final := authorities(srvSrc)
	if len(final) != 1 || final[0].Equal(firstRoot[0]) {
		t.Fatalf("bundle after rotation still holds the old root (%d authorities)", len(final))
	}
	for _, src := range []*workloadapi.X509Source{srvSrc, cliSrc} {
		chain := svid(src).Certificates
		top := chain[len(chain)-1]
		if err := top.CheckSignatureFrom(final[0]); err != nil {
			t.Fatalf("%s does not chain to the new root: %v", svid(src).ID, err)
		}
	}
	t.Logf("handshakes succeeded across %d server SVIDs and one root rotation", len(serials))
}
