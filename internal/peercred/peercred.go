// Package peercred reads the kernel-verified credentials of the process at
// the other end of a unix socket (SO_PEERCRED). Only Linux is supported.
package peercred

import (
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// Cred is the peer's pid, uid and gid as the kernel recorded them when the
// peer connected.
type Cred struct {
	PID int32
	UID uint32
	GID uint32
}

// ErrNotUnix is returned for connections that are not unix sockets.
var ErrNotUnix = errors.New("peercred: not a unix socket connection")

// Get returns the credentials of conn's peer.
func Get(conn net.Conn) (Cred, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return Cred{}, ErrNotUnix
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, fmt.Errorf("peercred: %w", err)
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Cred{}, fmt.Errorf("peercred: %w", err)
	}
	if serr != nil {
		return Cred{}, fmt.Errorf("peercred: getsockopt SO_PEERCRED: %w", serr)
	}
	return Cred{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}
