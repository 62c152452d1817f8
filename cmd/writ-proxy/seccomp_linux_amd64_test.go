package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/writmesh/writ/internal/syncbuf"
)

// Container runtimes' default seccomp profiles (moby's
// profiles/seccomp/default.json, which containerd's and Kubernetes'
// RuntimeDefault follow) allow no userfaultfd, with any capability, and
// answer EPERM for what they do not allow. These tests put writ-proxy
// under a filter that does the same for userfaultfd alone.

// Environment variables by which the test binary, re-executed as a
// child, knows what to do under the filter.
const (
	envSeccompExec  = "WRIT_TEST_SECCOMP_EXEC"  // "1": install the filter, then exec os.Args[1:]
	envSeccompProbe = "WRIT_TEST_SECCOMP_PROBE" // "1": TestTrimFallbackUnderSeccomp runs its probe
)

func TestMain(m *testing.M) {
	if os.Getenv(envSeccompExec) == "1" {
		// The filter is inherited across execve, as a container
		// runtime's is by the process it starts.
		if err := denyUserfaultfd(); err != nil {
			fmt.Fprintf(os.Stderr, "install seccomp filter: %v\n", err)
			os.Exit(3)
		}
		os.Unsetenv(envSeccompExec)
		err := syscall.Exec(os.Args[1], os.Args[1:], os.Environ())
		fmt.Fprintf(os.Stderr, "exec %s: %v\n", os.Args[1], err)
		os.Exit(3)
	}
	os.Exit(m.Run())
}

// denyUserfaultfd installs, on every thread of the process, a seccomp
// filter that fails userfaultfd(2) with EPERM and allows everything else.
func denyUserfaultfd() error {
	const auditArchX8664 = 0xc000003e // AUDIT_ARCH_X86_64
	prog, err := bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 4, Size: 4}, // seccomp_data.arch
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: auditArchX8664, SkipTrue: 2},
		bpf.LoadAbsolute{Off: 0, Size: 4}, // seccomp_data.nr
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_USERFAULTFD, SkipTrue: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW},
		bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
	})
	if err != nil {
		return err
	}
	// A call through another ABI (x86's int 0x80) numbers its calls
	// otherwise: the arch check sends it to ALLOW, as only x86_64's
	// userfaultfd is refused here.
	filter := make([]unix.SockFilter, len(prog))
	for i, ins := range prog {
		filter[i] = unix.SockFilter{Code: ins.Op, Jt: ins.Jt, Jf: ins.Jf, K: ins.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	// no_new_privs is per thread; seccomp's TSYNC sets it, and the
	// filter, on the process's other threads from the calling one.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("PR_SET_NO_NEW_PRIVS: %w", err)
	}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
	runtime.KeepAlive(filter)
	if errno != 0 {
		return fmt.Errorf("seccomp: %w", errno)
	}
	if r != 0 {
		return fmt.Errorf("seccomp: thread %d could not take the filter", r)
	}
	return nil
}

// TestTrimFallbackUnderSeccomp re-executes the test binary, which puts
// itself under the filter and probes, in its own mappings, what the trim
// does there: the trim is done, reports fault-around left on, and says
// why, once; a touched page of the executable then brings the 16 pages
// of the 64 KiB around it back, as before --confine-executable-faults.
func TestTrimFallbackUnderSeccomp(t *testing.T) {
	if os.Getenv(envSeccompProbe) == "1" {
		probeTrimUnderSeccomp(t)
		return
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestTrimFallbackUnderSeccomp$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), envSeccompProbe+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child under the filter: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "--- PASS: TestTrimFallbackUnderSeccomp") {
		t.Fatalf("the child did not run the probe:\n%s", out)
	}
}

func probeTrimUnderSeccomp(t *testing.T) {
	w := newFaultWindow(t)
	if err := denyUserfaultfd(); err != nil {
		t.Fatal(err)
	}
	if err := probeUserfaultfd(); !errors.Is(err, unix.EPERM) {
		t.Fatalf("userfaultfd(2) under the filter: %v, want EPERM", err)
	}
	var logs syncbuf.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	mode := trimMode{noFaultAround: true}
	if !trimAndReport(mode, false, log) {
		t.Fatal("the first trim under the filter did not report fault-around on")
	}
	if n, probed := w.touchAndCount(t); !probed || n != 16 {
		t.Fatalf("%d of the 16 pages around a touched one resident (touched one resident: %v), want all 16: fault-around on, as before", n, probed)
	}
	bytes, confined := trimExecutablePages(mode)
	if confined || bytes == 0 {
		t.Fatalf("trim under the filter: fault-around off %v, %d bytes trimmed; want false and the trim done", confined, bytes)
	}
	if n, probed := w.touchAndCount(t); !probed || n != 16 {
		t.Fatalf("second trim: %d of the 16 pages around a touched one resident (touched one resident: %v), want all 16", n, probed)
	}
	if !trimAndReport(mode, true, log) {
		t.Fatal("trimAndReport forgot it had reported")
	}
	lines := fallbackLines(t, logs.String())
	if len(lines) != 1 {
		t.Fatalf("%d fallback lines, want 1:\n%s", len(lines), logs.String())
	}
	if l := lines[0]; l.Level != "INFO" || !strings.Contains(l.Reason, "operation not permitted") {
		t.Fatalf("fallback line %+v, want level INFO and the EPERM as reason", l)
	}
}

// TestBinaryFallsBackUnderSeccomp runs the writ-proxy executable under
// the filter, as a container runtime would with its default profile:
// it must start, say once at Info why fault-around stays on, leave its
// mappings unregistered, serve /healthz and /metrics (the gauge at 0)
// and stop cleanly on SIGTERM.
func TestBinaryFallsBackUnderSeccomp(t *testing.T) {
	bin := writProxyBinary(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	adminAddr := freeAddr(t)
	cmd := exec.Command(exe, bin,
		"--control-plane", freeAddr(t), // nothing listens: the agent keeps retrying
		"--trust-bundle", writeBundle(t),
		"--trust-domain", "example.org",
		"--workload-api", "unix://"+t.TempDir()+"/agent.sock",
		"--admin-addr", adminAddr,
		"--http-proxy", freeAddr(t), // the proxy role, for its /metrics
	)
	cmd.Env = append(os.Environ(), envSeccompExec+"=1", "WRIT_JOIN_TOKEN=secret-token")
	var stderr syncbuf.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-done
	}()
	// Startup, not a timed assertion; an exit is reported at once.
	deadline := time.Now().Add(30 * time.Second)
	for healthz(adminAddr) != nil {
		select {
		case err := <-done:
			done <- err
			t.Fatalf("writ-proxy exited under the filter: %v\n%s", err, stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz never answered 200 (last: %v)\n%s", healthz(adminAddr), stderr.String())
		}
	}

	pid := cmd.Process.Pid
	running, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)) // the path smaps names
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(running) != "writ-proxy" {
		t.Fatalf("the child runs %s, want writ-proxy", running)
	}
	if mode := procStatus(t, pid, "Seccomp"); mode != "2" {
		t.Fatalf("writ-proxy's Seccomp mode %q, want 2 (filter): the test's filter is not in force", mode)
	}
	mappings, registered := executableUffdMappings(t, pid, running)
	if mappings == 0 {
		t.Fatalf("no read-only mapping of %s in /proc/%d/smaps", running, pid)
	}
	if registered > 0 {
		t.Fatalf("%d of %d read-only mappings of the executable registered with a userfaultfd (uw) under the filter", registered, mappings)
	}
	if got := gaugeValue(t, "http://"+adminAddr+"/metrics", "writ_executable_faults_confined"); got != "0" {
		t.Fatalf("writ_executable_faults_confined %s under the filter, want 0", got)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		done <- err
		if err != nil {
			t.Fatalf("writ-proxy exited with %v; stderr:\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("writ-proxy ignored SIGTERM")
	}
	lines := fallbackLines(t, stderr.String())
	if len(lines) != 1 {
		t.Fatalf("%d lines %q, want 1; stderr:\n%s", len(lines), msgFaultAroundOn, stderr.String())
	}
	if l := lines[0]; l.Level != "INFO" || !strings.Contains(l.Reason, "operation not permitted") {
		t.Fatalf("fallback line %+v, want level INFO and the EPERM as reason", l)
	}
	if !strings.Contains(stderr.String(), "writ-proxy stopped") {
		t.Fatalf("no clean stop in the log:\n%s", stderr.String())
	}
}

func healthz(addr string) error {
	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/healthz: status %d", resp.StatusCode)
	}
	return nil
}

type logLine struct {
	Level  string `json:"level"`
	Msg    string `json:"msg"`
	Reason string `json:"reason"`
}

// fallbackLines are the JSON log lines that say fault-around stays on.
func fallbackLines(t *testing.T, log string) []logLine {
	t.Helper()
	var out []logLine
	sc := bufio.NewScanner(strings.NewReader(log))
	for sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg == msgFaultAroundOn {
			out = append(out, l)
		}
	}
	return out
}

func procStatus(t *testing.T, pid int, field string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return ""
}

// executableUffdMappings counts the read-only mappings of exe in pid's
// smaps, and those of them whose VmFlags carry uw (registered with a
// userfaultfd in write-protect mode).
func executableUffdMappings(t *testing.T, pid int, exe string) (mappings, registered int) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	inExe := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		switch {
		case len(fields) >= 5 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":"):
			// A mapping's header: start-end perms offset dev inode [path].
			inExe = len(fields) >= 6 && fields[5] == exe && !strings.Contains(fields[1], "w")
			if inExe {
				mappings++
			}
		case inExe && len(fields) > 0 && fields[0] == "VmFlags:":
			for _, fl := range fields[1:] {
				if fl == "uw" {
					registered++
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return mappings, registered
}
