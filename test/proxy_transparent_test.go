package test

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writmesh/writ/proxy"
)

// inNetns runs f on an OS thread switched into the named network
// namespace. Sockets f creates stay in that namespace whichever thread
// later uses them; the thread is discarded afterwards.
func inNetns(t *testing.T, name string, f func()) {
	t.Helper()
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
	if err := <-done; err != nil {
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
		Clusters: []proxy.Cluster{{Name: "orders-tcp", Addresses: []string{"127.0.0.5:8080"},
			Endpoints: []proxy.Endpoint{{Address: s.proxy.Addr("tcp")}}, PeerIDs: []string{meshServerID.String()}}},
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
