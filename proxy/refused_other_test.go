//go:build !linux

package proxy

import (
	"net"
	"testing"
)

// refusedAddr is a loopback address nothing listens on (see the Linux
// version, which also keeps the port from being handed out again).
func refusedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}
