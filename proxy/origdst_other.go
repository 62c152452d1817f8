//go:build !linux

package proxy

import (
	"errors"
	"net"
)

func originalDst(net.Conn) (string, error) {
	return "", errors.New("transparent capture needs Linux (SO_ORIGINAL_DST)")
}
