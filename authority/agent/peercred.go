package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"

	"github.com/writmesh/writ/authority/selector"
)

// PeerInfo is what the kernel says about the process at the other end of a
// Workload API connection. It is a grpc credentials.AuthInfo, set by
// PeerCredentials during the handshake and read back with peer.FromContext.
//
// Safe for concurrent use: the exported fields never change after the
// handshake and the pidfd is guarded by a mutex.
type PeerInfo struct {
	credentials.CommonAuthInfo
	PID int32
	UID uint32
	GID uint32
	// pidfd refers to exactly the process that connected (SO_PEERPIDFD,
	// Linux 6.5+), or is -1 when the kernel cannot give one. mu guards it
	// against the connection closing it while a call still uses it: a
	// closed descriptor number may be reused for an unrelated file.
	mu    sync.Mutex
	pidfd int
}

// closePidfd releases the pidfd; later attestations fail closed.
func (p *PeerInfo) closePidfd() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pidfd >= 0 {
		unix.Close(p.pidfd)
		p.pidfd = -2
	}
}

// AuthType implements credentials.AuthInfo.
func (*PeerInfo) AuthType() string { return "writ-peercred" }

// PeerCredentials returns grpc transport credentials for a unix socket
// listener that authenticate nothing themselves but record the peer's
// credentials (SO_PEERCRED, and SO_PEERPIDFD where the kernel has it) so
// that the Workload API can attest the caller. The kernel fills these at
// connect(2), so a client cannot forge them. The credentials are stateless
// and safe for concurrent use.
func PeerCredentials() credentials.TransportCredentials { return peerCreds{} }

type peerCreds struct{}

func (peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peer credentials are server side only")
}

func (peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok || conn.LocalAddr().Network() != "unix" {
		return nil, nil, fmt.Errorf("peer credentials need a unix socket, got %T", conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, nil, fmt.Errorf("peer credentials: %w", err)
	}
	var (
		cred    *unix.Ucred
		credErr error
		pidfd   = -1
	)
	ctrlErr := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr != nil {
			return
		}
		if p, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == nil {
			pidfd = p
		}
	})
	if ctrlErr != nil {
		return nil, nil, fmt.Errorf("peer credentials: %w", ctrlErr)
	}
	if credErr != nil {
		return nil, nil, fmt.Errorf("read SO_PEERCRED: %w", credErr)
	}
	if cred.Pid <= 0 {
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
		return nil, nil, errors.New("peer has no pid (connected from another pid namespace?)")
	}
	info := &PeerInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		PID:            cred.Pid,
		UID:            cred.Uid,
		GID:            cred.Gid,
		pidfd:          pidfd,
	}
	return &peerConn{Conn: conn, info: info}, info, nil
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "writ-peercred"}
}

func (peerCreds) Clone() credentials.TransportCredentials { return peerCreds{} }

func (peerCreds) OverrideServerName(string) error { return nil }

// peerConn closes the pidfd with the connection.
type peerConn struct {
	net.Conn
	info *PeerInfo
	once sync.Once
}

func (c *peerConn) Close() error {
	c.once.Do(c.info.closePidfd)
	return c.Conn.Close()
}

// Selectors attests the peer: unix:uid and unix:gid from the kernel's
// credentials, unix:user and unix:group when the ids have names, and
// unix:path when the binary can be attributed to the peer without doubt.
// It runs on every call, not once per connection, so a process that
// exec(2)s another binary while holding the connection is judged by what it
// runs now.
func (p *PeerInfo) Selectors() (selector.Set, []error) {
	uid := strconv.FormatUint(uint64(p.UID), 10)
	gid := strconv.FormatUint(uint64(p.GID), 10)
	sels := []selector.Selector{
		{Type: "unix", Key: "uid", Value: uid},
		{Type: "unix", Key: "gid", Value: gid},
	}
	var errs []error
	if u, err := user.LookupId(uid); err == nil {
		sels = append(sels, selector.Selector{Type: "unix", Key: "user", Value: u.Username})
	}
	if g, err := user.LookupGroupId(gid); err == nil {
		sels = append(sels, selector.Selector{Type: "unix", Key: "group", Value: g.Name})
	}
	// Without a trustworthy path the workload simply lacks the unix:path
	// selector, so entries that require one do not match: fail closed.
	if path, err := p.exePath(); err == nil {
		sels = append(sels, selector.Selector{Type: "unix", Key: "path", Value: path})
	} else {
		errs = append(errs, err)
	}
	return selector.NewSet(sels...), errs
}

// exePath reads the peer's binary from /proc/<pid>/exe. The pid comes from
// SO_PEERCRED, recorded at connect(2); by the time we read /proc the peer
// may have exited and its pid been given to an unrelated process, whose
// binary we would then attribute to the peer. The uid and gid are not at
// risk (the kernel recorded them with the pid), only the path is. So:
//
//  1. read the process start time, 2. read the exe link, 3. prove the
//     process we read is still the peer.
//
// With a pidfd from SO_PEERPIDFD, step 3 is pidfd_send_signal(0): the pidfd
// pins the very process that connected, and a pid cannot be reused while
// its process lives, so if the peer is alive after step 2 then step 2 read
// the peer. This is free of races. Without a pidfd (kernels before 6.5) we
// check that the start time did not change across step 2, which catches a
// reuse during our reads but not one between connect(2) and step 1; that
// window needs the peer to exit and ~pid_max processes to be spawned in
// between, and is accepted as the residual risk on old kernels.
func (p *PeerInfo) exePath() (string, error) {
	start1, err := procStartTime(p.PID)
	if err != nil {
		return "", fmt.Errorf("read start time of pid %d: %w", p.PID, err)
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", p.PID))
	if err != nil {
		return "", fmt.Errorf("read binary of pid %d: %w", p.PID, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.pidfd == -2:
		return "", errors.New("connection closed")
	case p.pidfd >= 0:
		if err := unix.PidfdSendSignal(p.pidfd, 0, nil, 0); err != nil {
			return "", fmt.Errorf("pid %d exited during attestation: %w", p.PID, err)
		}
		return exe, nil
	}
	start2, err := procStartTime(p.PID)
	if err != nil {
		return "", fmt.Errorf("pid %d exited during attestation: %w", p.PID, err)
	}
	if start1 != start2 {
		return "", fmt.Errorf("pid %d was reused during attestation", p.PID)
	}
	return exe, nil
}

// procStartTime returns field 22 of /proc/<pid>/stat, the start time in
// clock ticks since boot. The command name (field 2) may contain spaces and
// parentheses, so fields are counted after its last ')'.
func procStartTime(pid int32) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	return parseStartTime(b)
}

func parseStartTime(b []byte) (string, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return "", errors.New("malformed stat")
	}
	fields := bytes.Fields(b[i+1:])
	// After ')' come field 3 (state) onwards; field 22 is index 19.
	if len(fields) < 20 {
		return "", errors.New("malformed stat")
	}
	return string(fields[19]), nil
}
