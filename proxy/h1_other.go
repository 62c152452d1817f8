//go:build !linux

package proxy

// alive cannot peek without blocking here; a stale connection costs one
// failed try, which RoundTrip repeats on a fresh connection.
func (t *h1Transport) alive(c *h1Conn) bool { return c.br.Buffered() == 0 }

type probe struct{}
