// Package freeport picks loopback TCP ports for tests that hand an
// address to another process to bind later.
//
// A port found by listening on port 0 and closing comes from the
// kernel's ephemeral range, the same range the kernel picks the local
// ports of outgoing connections from: by the time the other process
// binds it, a connection (to PostgreSQL, writd, an app) may hold it and
// the bind fails with "address already in use". The ports here lie below
// that range, where no outgoing connection is ever given a port.
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// low is the lowest port chosen: below it are well-known and registered
// services more likely to be in use.
const low = 10000

// Addr returns "127.0.0.1:P" for a port P that was free a moment ago.
// Other processes choosing ports the same way could still take it in
// between; the choice is random over thousands of ports to make that
// unlikely.
func Addr(tb testing.TB) string {
	tb.Helper()
	return fmt.Sprintf("127.0.0.1:%d", Range(tb, 1))
}

// Range returns the first of n consecutive ports that were free a moment
// ago, as Addr does for one.
func Range(tb testing.TB, n int) int {
	tb.Helper()
	high := ephemeralLow() - n
	if high <= low {
		tb.Fatalf("freeport: the ephemeral port range starts at %d, leaving no room below it", high+n)
	}
	for range 100 {
		base := low + rand.IntN(high-low)
		if free(base, n) {
			return base
		}
	}
	tb.Fatalf("freeport: no %d free consecutive ports found in [%d, %d)", n, low, high+n)
	return 0
}

// free reports whether ports base..base+n-1 can all be listened on now.
func free(base, n int) bool {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for p := base; p < base+n; p++ {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		ls = append(ls, l)
	}
	return true
}

// ephemeralLow is the first port of the kernel's ephemeral range; where
// it cannot be read, Linux's default start, 32768, which is below the
// start of other systems' (IANA's 49152).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return 32768
	}
	v, err := strconv.Atoi(f[0])
	if err != nil || v <= 0 {
		return 32768
	}
	return v
}
