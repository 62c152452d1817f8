package proxy

import "syscall"

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
