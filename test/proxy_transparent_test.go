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
// namespace, reporting a failure to switch. The thread is switched back
// and unlocked afterwards rather than left to exit: a child started with
// Pdeathsig (pgtest's postgres) is signalled when the thread that forked
// it exits, and that may be this one.
func netnsDo(name string, f func()) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // unlocked only once back in the original namespace
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- err
			return
		}
		defer unix.Close(orig)
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
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("setns back: %w", err) // the thread stays locked and exits
			return
		}
		runtime.UnlockOSThread()
		done <- nil
	}()
	return <-done
}

// inNetns runs f on an OS thread switched into the named network
// namespace. Sockets f creates stay in that namespace whichever thread
// later uses them.
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
	c := nsHTTPClient(ns)
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

// TestTransparentCaptureIPv6: the same as TestTransparentCapture for an
// IPv6 service address. In a namespace the test creates, fd00::10 is a
// local address, and ip6tables REDIRECTs the app's connections to it to
// the proxy's transparent listener on [::1], which reads the original
// destination (IP6T_SO_ORIGINAL_DST) and picks the cluster by it. A
// second, IPv4 transparent listener beside it shows an IPv4 destination
// matching a cluster address written in IPv4-mapped form.
func TestTransparentCaptureIPv6(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("transparent capture needs root (network namespaces and ip6tables)")
	}
	for _, tool := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("transparent capture needs %s (apt-get install iptables)", tool)
		}
	}
	ns := fmt.Sprintf("writ-tp6-%d", os.Getpid())
	runCmd(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	runCmd(t, "ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
	// nodad: the address is usable at once instead of after duplicate
	// address detection.
	runCmd(t, "ip", "netns", "exec", ns, "ip", "-6", "addr", "add", "fd00::10/128", "dev", "lo", "nodad")
	runCmd(t, "ip", "netns", "exec", ns, "ip", "-6", "addr", "add", "fd00::11/128", "dev", "lo", "nodad")
	runCmd(t, "ip", "netns", "exec", ns, "ip", "-6", "addr", "add", "fd00::12/128", "dev", "lo", "nodad")

	m := startMesh(t)
	s := startServerSide(t, m)
	peer := []string{meshServerID.String()}
	cfg := &proxy.Config{
		Clusters: []proxy.Cluster{
			{Name: "orders-tcp", Addresses: []string{"[fd00::10]:8080", "[::ffff:127.0.0.7]:8080"}, Endpoints: []proxy.Endpoint{{Address: s.proxy.Addr("tcp")}}, PeerIDs: peer},
			{Name: "orders", Addresses: []string{"[fd00::10]:80"}, Endpoints: []proxy.Endpoint{{Address: s.proxy.Addr("http")}}, PeerIDs: peer},
			// Same port, another address: picking it for fd00::10 would
			// send the HTTP request to a TCP echo.
			{Name: "decoy", Addresses: []string{"[fd00::11]:80"}, Endpoints: []proxy.Endpoint{{Address: s.proxy.Addr("tcp")}}, PeerIDs: peer},
		},
		Outbound: []proxy.Outbound{
			{Name: "capture6", Address: "[::1]:0", Protocol: "transparent"},
			{Name: "capture4", Address: "127.0.0.1:0", Protocol: "transparent"},
		},
	}
	var cli *proxy.Proxy
	inNetns(t, ns, func() { cli, _ = runProxy(t, cfg, proxy.Options{Source: m.sources[meshClientID]}) })
	_, port6, _ := net.SplitHostPort(cli.Addr("capture6"))
	_, port4, _ := net.SplitHostPort(cli.Addr("capture4"))
	// Without IPv6 NAT in the kernel (nf_nat, ip6table_nat or nft nat for
	// ip6) this is where the test stops.
	if out, err := exec.Command("ip", "netns", "exec", ns, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd00::10", "-j", "REDIRECT", "--to-ports", port6).CombinedOutput(); err != nil {
		t.Fatalf("ip6tables REDIRECT: the kernel needs IPv6 NAT (CONFIG_IP6_NF_NAT or nft nat for ip6): %v\n%s", err, out)
	}

	dial := func(addr string) net.Conn {
		t.Helper()
		var conn net.Conn
		var err error
		inNetns(t, ns, func() { conn, err = net.DialTimeout("tcp", addr, 5*time.Second) })
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		return conn
	}
	conn := dial("[fd00::10]:8080")
	if got := conn.LocalAddr().(*net.TCPAddr).IP; got.To4() != nil {
		t.Fatalf("the app's connection is not IPv6: from %v", got)
	}
	fmt.Fprintf(conn, "captured6\n")
	if line, err := bufio.NewReader(conn).ReadString('\n'); err != nil || line != "echo captured6\n" {
		t.Fatalf("captured IPv6 connection through the pair: %q %v", line, err)
	}

	c := nsHTTPClient(ns)
	resp, err := c.Get("http://[fd00::10]/captured6")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "orders HTTP/1.1 /captured6" {
		t.Fatalf("captured IPv6 HTTP: %d %q", resp.StatusCode, body)
	}
	var sawXFCC bool
	for len(s.seen) > 0 && !sawXFCC {
		h := <-s.seen
		if h.Get("Test-Path") == "/captured6" {
			if !strings.HasSuffix(h.Get("X-Forwarded-Client-Cert"), ";URI="+meshClientID.String()) {
				t.Fatalf("app saw XFCC %q", h.Get("X-Forwarded-Client-Cert"))
			}
			sawXFCC = true
		}
	}
	if !sawXFCC {
		t.Fatal("the app never saw /captured6")
	}
	var decided bool
	for _, d := range s.sink.all() {
		if d.Path == "/captured6" && d.Source == meshClientID.String() && d.Result == "allow" {
			decided = true
		}
	}
	if !decided {
		t.Fatalf("no allowed decision for the captured IPv6 request: %v", s.sink.results())
	}

	// The same port on another address is another cluster's: opaque
	// bytes reach the decoy's TCP echo.
	runCmd(t, "ip", "netns", "exec", ns, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd00::11", "-j", "REDIRECT", "--to-ports", port6)
	conn = dial("[fd00::11]:80")
	fmt.Fprintf(conn, "decoy\n")
	if line, err := bufio.NewReader(conn).ReadString('\n'); err != nil || line != "echo decoy\n" {
		t.Fatalf("captured connection to the decoy's address: %q %v", line, err)
	}

	// An IPv4 destination finds the cluster address written as
	// ::ffff:127.0.0.7.
	runCmd(t, "ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.7", "--dport", "8080", "-j", "REDIRECT", "--to-ports", port4)
	conn = dial("127.0.0.7:8080")
	fmt.Fprintf(conn, "mapped\n")
	if line, err := bufio.NewReader(conn).ReadString('\n'); err != nil || line != "echo mapped\n" {
		t.Fatalf("IPv4 destination of an IPv4-mapped cluster address: %q %v", line, err)
	}

	// A destination no cluster claims is refused, on another address and
	// on another port of a claimed one.
	runCmd(t, "ip", "netns", "exec", ns, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd00::12", "-j", "REDIRECT", "--to-ports", port6)
	for _, addr := range []string{"[fd00::12]:8080", "[fd00::10]:9090"} {
		conn = dial(addr)
		fmt.Fprintf(conn, "lost\n")
		if line, _ := bufio.NewReader(conn).ReadString('\n'); line != "" {
			t.Fatalf("unclaimed destination %s got %q", addr, line)
		}
	}
}

// nsHTTPClient is an HTTP client whose connections start in network
// namespace ns, where the capture rules are.
func nsHTTPClient(ns string) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		var err error
		if nerr := netnsDo(ns, func() { c, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr) }); nerr != nil {
			return nil, nerr
		}
		return c, err
	}}}
}
