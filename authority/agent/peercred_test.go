package agent

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/writmesh/writ/authority/selector"
)

func TestParseStartTime(t *testing.T) {
	rest := " S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21"
	tests := []struct {
		name, stat, want string
		wantErr          bool
	}{
		{"plain", "123 (sleep)" + rest, "424242", false},
		{"comm with spaces and parens", "123 (a) S 9 (b)" + rest, "424242", false},
		{"truncated", "123 (sleep) S 1 2", "", true},
		{"no comm", "garbage", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStartTime([]byte(tt.stat))
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("got %q, %v; want %q, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

// TestPeerCredentialsAttestOwnProcess connects to a listener with the
// real handshake and checks the selectors found for this very process.
func TestPeerCredentialsAttestOwnProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan *PeerInfo, 1)
	conns := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- nil
			return
		}
		conn, info, err := PeerCredentials().ServerHandshake(c)
		if err != nil {
			t.Error(err)
			got <- nil
			return
		}
		conns <- conn
		got <- info.(*PeerInfo)
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info := <-got
	if info == nil {
		t.Fatal("handshake failed")
	}
	if int(info.PID) != os.Getpid() || int(info.UID) != os.Getuid() || int(info.GID) != os.Getgid() {
		t.Fatalf("got pid %d uid %d gid %d, want %d %d %d", info.PID, info.UID, info.GID, os.Getpid(), os.Getuid(), os.Getgid())
	}
	sels, errs := info.Selectors()
	if len(errs) != 0 {
		t.Fatalf("attestation errors: %v", errs)
	}
	exe, _ := os.Executable()
	for _, want := range []string{"unix:uid:" + strconv.Itoa(os.Getuid()), "unix:gid:" + strconv.Itoa(os.Getgid()), "unix:path:" + exe} {
		s, err := selector.Parse(want)
		if err != nil {
			t.Fatal(err)
		}
		if !sels.Matches([]selector.Selector{s}) {
			t.Errorf("selector %s missing from %v", want, sels)
		}
	}
	if os.Getuid() == 0 && !sels.Matches([]selector.Selector{{Type: "unix", Key: "user", Value: "root"}}) {
		t.Error("unix:user:root missing for uid 0")
	}

	// Once the connection is closed its pidfd is gone: the path can no
	// longer be vouched for and is left out (kernels with SO_PEERPIDFD).
	hadPidfd := info.pidfd >= 0
	(<-conns).Close()
	sels, errs = info.Selectors()
	if hadPidfd && (len(errs) == 0 || sels.Matches([]selector.Selector{{Type: "unix", Key: "path", Value: exe}})) {
		t.Fatalf("path still attested after close: %v", sels)
	}
}

func TestPeerCredentialsRefuseNonUnix(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, _, err := PeerCredentials().ServerHandshake(a); err == nil || !strings.Contains(err.Error(), "unix socket") {
		t.Fatalf("got %v, want an error naming the unix socket requirement", err)
	}
	if _, _, err := PeerCredentials().ClientHandshake(context.Background(), "", a); err == nil {
		t.Fatal("client handshake must fail")
	}
}

func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	notSock := filepath.Join(dir, "file")
	os.WriteFile(notSock, nil, 0o600)
	stale := filepath.Join(dir, "stale.sock")
	sl, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	sl.(*net.UnixListener).SetUnlinkOnClose(false)
	sl.Close()

	tests := []struct {
		name, addr, wantErr string
	}{
		{"creates directories", "unix://" + filepath.Join(dir, "a", "b", "agent.sock"), ""},
		{"replaces a stale socket", "unix://" + stale, ""},
		{"refuses to replace a file", "unix://" + notSock, "not a socket"},
		{"tcp", "tcp://127.0.0.1:1", "want unix:///absolute/path.sock"},
		{"relative", "unix:agent.sock", "want unix:///absolute/path.sock"},
		{"with host", "unix://host/agent.sock", "want unix:///absolute/path.sock"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, path, err := ListenUnix(tt.addr)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %v, want error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o777 {
				t.Fatalf("socket mode %v, want 0777", fi.Mode().Perm())
			}
		})
	}
}

// selfPeerInfo handshakes with itself over a real unix socket and keeps
// the connection open for the rest of the test.
func selfPeerInfo(t testing.TB) *PeerInfo {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	conn, info, err := PeerCredentials().ServerHandshake(s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return info.(*PeerInfo)
}
