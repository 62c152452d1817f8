package proxy

import "syscall"

// alive peeks at an idle connection without blocking: the peer's FIN
// (or, in plaintext, any unexpected byte) retires it. Over TLS a pending
// record (a session ticket) is fine: the next read consumes it.
func (t *h1Transport) alive(c *h1Conn) bool {
	if c.br.Buffered() > 0 {
		return false
	}
	sc, ok := c.raw.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	ok = true
	var buf [1]byte
	_ = rc.Read(func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK:
		case err != nil || n == 0:
			ok = false
		default:
			ok = t.tls
		}
		return true
	})
	return ok
}
