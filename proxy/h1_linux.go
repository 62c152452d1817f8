package proxy

import (
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// probe is a connection's liveness check, kept with it so that a check
// allocates nothing.
type probe struct {
	rc  syscall.RawConn
	fn  func(fd uintptr) bool
	buf [1]byte
	ok  bool
	tls bool
}

// alive peeks at an idle connection without blocking: the peer's FIN
// (or, in plaintext, any unexpected byte) retires it. Over TLS a pending
// record (a session ticket) is fine: the next read consumes it.
func (t *h1Transport) alive(c *h1Conn) bool {
	if c.br.Buffered() > 0 {
		return false
	}
	if c.deadline {
		// The last request's deadline, long past, would end the peek
		// before it looks.
		_ = c.c.SetDeadline(time.Time{})
		c.deadline = false
	}
	if c.probe == nil {
		sc, ok := c.raw.(syscall.Conn)
		if !ok {
			return true
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			return false
		}
		p := &probe{rc: rc, tls: t.tls}
		p.fn = p.peek
		c.probe = p
	}
	p := c.probe
	p.ok = true
	_ = p.rc.Read(p.fn)
	return p.ok
}

func (p *probe) peek(fd uintptr) bool {
	n, _, err := syscall.Recvfrom(int(fd), p.buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	switch {
	case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK:
	case err != nil || n == 0:
		p.ok = false
	default:
		p.ok = p.tls
	}
	return true
}

// ackedAtStart is the kernel's count of acknowledged bytes on a
// connection that has sent nothing yet; -1 if it cannot be read.
func ackedAtStart(c net.Conn) int64 {
	acked, ok := tcpAcked(c)
	if !ok {
		return -1
	}
	return int64(acked)
}

func tcpAcked(c net.Conn) (uint64, bool) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var acked uint64
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		var info *unix.TCPInfo
		info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if ierr == nil {
			acked = info.Bytes_acked
		}
	}); err != nil || ierr != nil {
		return 0, false
	}
	return acked, true
}

// untaken tells whether the peer's TCP has acknowledged none of the
// bytes written after the first sentBefore (exchange says why that means
// the peer never read them). A count of zero is not taken as proof: a
// reused connection has had bytes acknowledged, and kernels before 4.1
// report none at all.
func (c *h1Conn) untaken(sentBefore int64) bool {
	if c.sent == nil || c.sent.n <= sentBefore {
		return false
	}
	acked, ok := tcpAcked(c.sent.Conn)
	return ok && acked > 0 && acked <= uint64(sentBefore)
}
