package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// soOriginalDst is SO_ORIGINAL_DST from linux/netfilter_ipv4.h (level
	// SOL_IP).
	soOriginalDst = 80
	// ip6tSoOriginalDst is IP6T_SO_ORIGINAL_DST from
	// linux/netfilter_ipv6/ip6_tables.h (level SOL_IPV6).
	ip6tSoOriginalDst = 80
)

// originalDst is where an iptables-redirected connection was headed, read
// from the connection's socket: the IPv4 or IPv6 conntrack entry,
// according to the family of the connection's local address. An IPv4
// connection accepted on an IPv6 socket (local address ::ffff:a.b.c.d)
// was tracked as IPv4, so it is asked at SOL_IP: the kernel finds no IPv6
// entry for it.
func originalDst(c net.Conn) (netip.AddrPort, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return netip.AddrPort{}, errors.New("not a tcp connection")
	}
	local, ok := tc.LocalAddr().(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, errors.New("no local tcp address")
	}
	la, ok := netip.AddrFromSlice(local.IP)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("local address %v", local.IP)
	}
	v4 := la.Is4() || la.Is4In6()
	raw, err := tc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var dst netip.AddrPort
	var serr error
	if err := raw.Control(func(fd uintptr) {
		var buf [unix.SizeofSockaddrInet6]byte
		n := uint32(len(buf))
		level, name := unix.SOL_IPV6, ip6tSoOriginalDst
		if v4 {
			level, name = unix.SOL_IP, soOriginalDst
		}
		if _, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(name), uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0); e != 0 {
			serr = fmt.Errorf("getsockopt original destination: %w", e)
			return
		}
		if v4 {
			dst, serr = decodeSockaddrIn(buf[:n])
		} else {
			dst, serr = decodeSockaddrIn6(buf[:n])
		}
	}); err != nil {
		return netip.AddrPort{}, err
	}
	return dst, serr
}

// decodeSockaddrIn reads a struct sockaddr_in as the kernel writes it:
// family in host byte order, then port and address in network order.
func decodeSockaddrIn(b []byte) (netip.AddrPort, error) {
	if len(b) < 8 {
		return netip.AddrPort{}, fmt.Errorf("sockaddr_in: %d bytes", len(b))
	}
	if f := binary.NativeEndian.Uint16(b); f != unix.AF_INET {
		return netip.AddrPort{}, fmt.Errorf("sockaddr_in: family %d", f)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:])), nil
}

// decodeSockaddrIn6 reads a struct sockaddr_in6 (family, port, flowinfo,
// 16-byte address, scope id). The kernel sets a scope id only for a
// link-local destination of a socket bound to a device; it is kept as a
// numeric zone ("fe80::1%3") for such an address and dropped otherwise,
// as a zone means nothing on a global address. Cluster matching ignores
// zones (serviceAddr).
func decodeSockaddrIn6(b []byte) (netip.AddrPort, error) {
	if len(b) < unix.SizeofSockaddrInet6 {
		return netip.AddrPort{}, fmt.Errorf("sockaddr_in6: %d bytes", len(b))
	}
	if f := binary.NativeEndian.Uint16(b); f != unix.AF_INET6 {
		return netip.AddrPort{}, fmt.Errorf("sockaddr_in6: family %d", f)
	}
	addr := netip.AddrFrom16([16]byte(b[8:24]))
	scope := binary.NativeEndian.Uint32(b[24:])
	if scope != 0 && addr.IsLinkLocalUnicast() {
		addr = addr.WithZone(strconv.FormatUint(uint64(scope), 10))
	}
	return netip.AddrPortFrom(addr, binary.BigEndian.Uint16(b[2:])), nil
}
