//go:build !linux

package proxy

import "net"

// alive cannot peek without blocking here; a stale connection costs one
// failed try, which RoundTrip repeats on a fresh connection.
func (t *h1Transport) alive(c *h1Conn) bool { return c.br.Buffered() == 0 }

type probe struct{}

// untaken cannot ask the kernel what the peer acknowledged here.
func (c *h1Conn) untaken(int64) bool { return false }

// ackedAtStart is -1: untaken has nothing to compare it with.
func ackedAtStart(net.Conn) int64 { return -1 }
