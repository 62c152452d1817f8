//go:build !linux

package proxy

import (
	"errors"
	"net"
	"net/netip"
)

func originalDst(net.Conn) (netip.AddrPort, error) {
	return netip.AddrPort{}, errors.New("transparent capture needs Linux (SO_ORIGINAL_DST)")
}
