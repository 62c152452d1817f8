package proxy

import (
	"errors"
	"net"
	"strconv"
	"syscall"
)

// soOriginalDst is SO_ORIGINAL_DST from linux/netfilter_ipv4.h.
const soOriginalDst = 80

// originalDst is where an iptables-redirected connection was headed,
// read from the connection's socket (IPv4 only).
func originalDst(c net.Conn) (string, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return "", errors.New("not a tcp connection")
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return "", err
	}
	var addr string
	var serr error
	if err := raw.Control(func(fd uintptr) {
		// The kernel answers with a sockaddr_in, which fits the 16-byte
		// multiaddr of this getsockopt wrapper.
		m, err := syscall.GetsockoptIPv6Mreq(int(fd), syscall.IPPROTO_IP, soOriginalDst)
		if err != nil {
			serr = err
			return
		}
		b := m.Multiaddr
		addr = net.JoinHostPort(net.IPv4(b[4], b[5], b[6], b[7]).String(), strconv.Itoa(int(b[2])<<8|int(b[3])))
	}); err != nil {
		return "", err
	}
	return addr, serr
}
