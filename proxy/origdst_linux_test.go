package proxy

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// sockaddrIn6 lays out a struct sockaddr_in6 as the kernel does.
func sockaddrIn6(family uint16, port uint16, addr string, scope uint32) []byte {
	b := make([]byte, unix.SizeofSockaddrInet6)
	binary.NativeEndian.PutUint16(b, family)
	binary.BigEndian.PutUint16(b[2:], port)
	binary.BigEndian.PutUint32(b[4:], 0x12345) // flowinfo, ignored
	a := netip.MustParseAddr(addr).As16()
	copy(b[8:24], a[:])
	binary.NativeEndian.PutUint32(b[24:], scope)
	return b
}

func TestDecodeSockaddrIn6(t *testing.T) {
	tests := []struct {
		name string
		b    []byte
		want string // AddrPort.String, or an error substring after "error: "
	}{
		{"global", sockaddrIn6(unix.AF_INET6, 8080, "fd00::10", 0), "[fd00::10]:8080"},
		{"loopback, high port", sockaddrIn6(unix.AF_INET6, 65535, "::1", 0), "[::1]:65535"},
		{"ipv4-mapped stays mapped", sockaddrIn6(unix.AF_INET6, 80, "::ffff:10.0.0.1", 0), "[::ffff:10.0.0.1]:80"},
		{"link-local keeps its scope", sockaddrIn6(unix.AF_INET6, 443, "fe80::1", 3), "[fe80::1%3]:443"},
		{"link-local without scope", sockaddrIn6(unix.AF_INET6, 443, "fe80::1", 0), "[fe80::1]:443"},
		{"scope on a global address dropped", sockaddrIn6(unix.AF_INET6, 443, "2001:db8::1", 7), "[2001:db8::1]:443"},
		{"wrong family", sockaddrIn6(unix.AF_INET, 80, "::1", 0), "error: family 2"},
		{"short", sockaddrIn6(unix.AF_INET6, 80, "::1", 0)[:24], "error: 24 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ap, err := decodeSockaddrIn6(tt.b)
			got := ap.String()
			if err != nil {
				got = "error: " + err.Error()
			}
			if !strings.HasPrefix(tt.want, "error: ") && got != tt.want || strings.HasPrefix(tt.want, "error: ") && !strings.Contains(got, strings.TrimPrefix(tt.want, "error: ")) {
				t.Fatalf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func TestDecodeSockaddrIn(t *testing.T) {
	b := make([]byte, unix.SizeofSockaddrInet4)
	binary.NativeEndian.PutUint16(b, unix.AF_INET)
	binary.BigEndian.PutUint16(b[2:], 8080)
	copy(b[4:8], []byte{127, 0, 0, 5})
	if ap, err := decodeSockaddrIn(b); err != nil || ap.String() != "127.0.0.5:8080" {
		t.Fatalf("got %v %v, want 127.0.0.5:8080", ap, err)
	}
	binary.NativeEndian.PutUint16(b, unix.AF_INET6)
	if _, err := decodeSockaddrIn(b); err == nil {
		t.Fatal("an AF_INET6 family decoded as sockaddr_in")
	}
}
