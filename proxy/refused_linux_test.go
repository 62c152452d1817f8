package proxy

import (
	"fmt"
	"syscall"
	"testing"
)

// refusedAddr is a loopback address that refuses connections for the
// whole test: a TCP socket bound to it and never listening answers a SYN
// with a reset, and holds the port, so no listener of a concurrent test
// (or of the test's own proxies) can be given it. A port merely closed
// after a listen can be handed out again by the next bind to port 0.
func refusedAddr(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
}
