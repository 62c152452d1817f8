package test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writmesh/writ/proxy"
)

// netnsDo runs f on an OS thread switched into the named network
// namespace, reporting a failure to switch.
func netnsDo(name string, f func()) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		fd, err := unix.Open("/var/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("setns: %w", err)
			return
		}
		f()
		done <- nil
	}()
	return <-done
}

// inNetns runs f on an OS thread switched into the named network
// namespace. Sockets f creates stay in that namespace whichever thread
// later uses them; the thread is discarded afterwards.
func inNetns(t *testing.T, name string, f func()) {
	t.Helper()
	if err := netnsDo(name, f); err != nil {
		t.Fatal(err)
	}
}

func runCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestTransparentCapture: in a network namespace the test creates, an
// iptables REDIRECT sends the app's connection to 127.0.0.5:8080 to the
// proxy's transparent port, which finds the cluster by the original
// destination and carries the bytes over mTLS to the orders sidecar.
func TestTransparentCapture(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("transparent capture needs root (network namespaces and iptables)")
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Fatal("transparent capture needs iptables (apt-get install iptables)")
	}
	ns := fmt.Sprintf("writ-tp-%d", os.Getpid())
	runCmd(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	runCmd(t, "ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

	m := startMesh(t)
	s := startServerSide(t, m)
	cfg := &proxy.Config{
		Clusters: []proxy.Cluster{
			{Name: "orders-tcp", Addresses: []string{"127.0.0.5:8080"}, Endpoints: []proxy.Endpoint{{Address: s.proxy.Addr("tcp")}}, PeerIDs: []string{meshServerID.String()}},
			{Name: "orders", Addresses: []string{"127.0.0.5:80"}, Endpoints: []proxy.Endpoint{{Address: s.proxy.Addr("http")}}, PeerIDs: []string{meshServerID.String()}},
		},
		Outbound: []proxy.Outbound{{Name: "capture", Address: "127.0.0.1:0", Protocol: "transparent"}},
	}
	// The client proxy's listeners live in the namespace; its connections
	// to the orders sidecar leave from the host's loopback.
	var cli *proxy.Proxy
	inNetns(t, ns, func() { cli, _ = runProxy(t, cfg, proxy.Options{Source: m.sources[meshClientID]}) })
	_, port, _ := net.SplitHostPort(cli.Addr("capture"))
	runCmd(t, "ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.5", "--dport", "8080", "-j", "REDIRECT", "--to-ports", port)

	var conn net.Conn
	var err error
	inNetns(t, ns, func() { conn, err = net.DialTimeout("tcp", "127.0.0.5:8080", 5*time.Second) })
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "captured\n")
	if line, err := bufio.NewReader(conn).ReadString('\n'); err != nil || line != "echo captured\n" {
		t.Fatalf("captured connection through the pair: %q %v", line, err)
	}
	// Captured HTTP is proxied per request: the app sees the caller's
	// verified identity, and policy decided the request.
	runCmd(t, "ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.5", "--dport", "80", "-j", "REDIRECT", "--to-ports", port)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		var err error
		if nerr := netnsDo(ns, func() { c, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr) }); nerr != nil {
			return nil, nerr
		}
		return c, err
	}}}
	resp, err := c.Get("http://127.0.0.5/captured")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "orders HTTP/1.1 /captured" {
		t.Fatalf("captured HTTP: %d %q", resp.StatusCode, body)
	}
	for h := range s.seen {
		if h.Get("Test-Path") == "/captured" {
			if !strings.HasSuffix(h.Get("X-Forwarded-Client-Cert"), ";URI="+meshClientID.String()) {
				t.Fatalf("app saw XFCC %q", h.Get("X-Forwarded-Client-Cert"))
			}
			break
		}
	}
	if got := s.sink.results(); !containsStr(got, meshClientID.String()+" allow") {
		t.Fatalf("no allowed decision for the captured request: %v", got)
	}

	// A destination no cluster claims is refused.
	runCmd(t, "ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.6", "--dport", "8080", "-j", "REDIRECT", "--to-ports", port)
	inNetns(t, ns, func() { conn, err = net.DialTimeout("tcp", "127.0.0.6:8080", 5*time.Second) })
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "lost\n")
	if line, _ := bufio.NewReader(conn).ReadString('\n'); line != "" {
		t.Fatalf("unclaimed destination got %q", line)
	}
}
