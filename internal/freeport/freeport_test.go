package freeport

import (
	"net"
	"strconv"
	"testing"
)

// TestRangeBelowEphemeral: the ports given are free and below the
// kernel's ephemeral range, where outgoing connections get theirs.
func TestRangeBelowEphemeral(t *testing.T) {
	lo := ephemeralLow()
	for range 20 {
		base := Range(t, 3)
		if base < low || base+3 > lo {
			t.Fatalf("range %d..%d outside [%d, %d)", base, base+2, low, lo)
		}
		for p := base; p < base+3; p++ {
			l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
			if err != nil {
				t.Fatalf("port %d not free: %v", p, err)
			}
			l.Close()
		}
	}
	_, port, err := net.SplitHostPort(Addr(t))
	if err != nil {
		t.Fatal(err)
	}
	if p, _ := strconv.Atoi(port); p < low || p >= lo {
		t.Fatalf("Addr port %d outside [%d, %d)", p, low, lo)
	}
}

// TestRangeSkipsTakenPorts: a port somebody listens on is never given.
func TestRangeSkipsTakenPorts(t *testing.T) {
	for range 20 {
		base := Range(t, 1)
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(base))
		if err != nil {
			t.Fatal(err)
		}
		if free(base, 1) {
			t.Fatalf("port %d reported free while listened on", base)
		}
		l.Close()
	}
}
