package main

import (
	"bufio"
	"context"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/writmesh/writ/internal/syncbuf"
)

// TestTrimConfinesFaultAround touches one page of the executable's
// function-name table (read only to print stack traces, so nothing else
// in the test brings it in) after a trim, and counts the resident pages
// of the 64 KiB around it: with fault-around off in the executable's
// mappings, the touched page comes alone (without, all 16 did), and
// without a VMA per page. The kernel needs UFFD_FEATURE_WP_ASYNC (Linux
// 6.7); on an older one the trim must say so and change nothing else.
// Where userfaultfd(2) itself is refused (a container's default seccomp
// profile, a sandbox) it fails saying so: the feature is then off, and
// CI's machines allow it so that this test sees it work.
// TestTrimFallbackUnderSeccomp covers the refusal.
func TestTrimConfinesFaultAround(t *testing.T) {
	w := newFaultWindow(t)
	if !kernelAtLeast(t, 6, 7) {
		bytes, confined := trimExecutablePages(trimMode{noFaultAround: true})
		if confined || bytes == 0 {
			t.Fatalf("kernel before 6.7: trim reports fault-around off %v, %d bytes trimmed; want false and the trim done", confined, bytes)
		}
		w.touchAndCount(t)
		return
	}
	if err := probeUserfaultfd(); err != nil {
		t.Fatalf("userfaultfd(2) refused by this environment: %v (EPERM is what a seccomp profile answers, Docker's default and Kubernetes' RuntimeDefault among them; ENOSYS, a kernel or sandbox without it). --confine-executable-faults cannot work here, so this test cannot check it; CI runs it where userfaultfd is allowed: run it outside the container, or under a seccomp profile that allows userfaultfd", err)
	}
	for i := range 2 { // the second trim re-registers what the first did
		bytes, confined := trimExecutablePages(trimMode{noFaultAround: true})
		if !confined {
			t.Fatalf("trim %d: fault-around not turned off (%d bytes of mappings trimmed)", i, bytes)
		}
		if n, probed := w.touchAndCount(t); !probed || n > 2 {
			t.Fatalf("trim %d: %d of the 16 pages around a touched one resident (touched one resident: %v), want it alone", i, n, probed)
		}
	}
	if _, confined := trimExecutablePages(trimMode{}); confined {
		t.Fatal("a trim without noFaultAround or split reports fault-around confined")
	}
	if vmas := executableVMAs(t); vmas > 100 {
		t.Fatalf("%d read-only mappings of the executable without the split, want the ELF's few", vmas)
	}
}

// TestSplitConfinesFaultAround: with split, the mappings are cut page by
// page, which confines fault-around where the kernel has no other way.
// (Fault-around is already off here if TestTrimConfinesFaultAround ran
// first in this process; the VMA count is what tells the split.)
func TestSplitConfinesFaultAround(t *testing.T) {
	w := newFaultWindow(t)
	t.Cleanup(func() {
		// Clearing VM_DONTDUMP again lets the kernel merge the pieces,
		// so that a later TestTrimConfinesFaultAround in this process
		// (-count) finds the ELF's few mappings.
		for _, r := range executableMappings() {
			if err := madvise(r.lo, r.hi-r.lo, unix.MADV_DODUMP); err != nil {
				t.Errorf("rejoin the split mappings: %v", err)
			}
		}
		if vmas := executableVMAs(t); vmas > 100 {
			t.Errorf("%d read-only mappings of the executable after rejoining the split, want the ELF's few", vmas)
		}
	})
	trimExecutablePages(trimMode{split: true})
	if n, probed := w.touchAndCount(t); !probed || n > 2 {
		t.Fatalf("with the split: %d of the 16 pages around a touched one resident (touched one resident: %v), want it alone", n, probed)
	}
	if vmas := executableVMAs(t); vmas < 1000 {
		t.Fatalf("%d read-only mappings of the executable after the split, want one per page", vmas)
	}
}

// faultWindow is a 64 KiB-aligned window of the executable's
// function-name table, all of it in the page cache.
type faultWindow struct{ window uintptr }

func newFaultWindow(t *testing.T) faultWindow {
	exe, err := os.ReadFile("/proc/self/exe") // in the page cache, as a running proxy's is
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sec := f.Section(".gopclntab")
	if sec == nil {
		t.Fatal("no .gopclntab")
	}
	hdr := exe[sec.Offset : sec.Offset+72]
	// pcHeader (Go 1.20+): funcnameOffset at 32, cuOffset at 40.
	names, cus := binary.LittleEndian.Uint64(hdr[32:]), binary.LittleEndian.Uint64(hdr[40:])
	window := uintptr(sec.Addr+(names+cus)/2) &^ (64<<10 - 1)
	if uint64(window) < sec.Addr+names || uint64(window)+64<<10 > sec.Addr+cus {
		t.Fatalf("function-name table [%#x, %#x) too small for a 64 KiB window", sec.Addr+names, sec.Addr+cus)
	}
	return faultWindow{window}
}

// touchAndCount reads the window's sixth page and counts the window's
// resident pages; it also reports whether the touched one is resident.
func (w faultWindow) touchAndCount(t *testing.T) (int, bool) {
	const page = 4096
	probeSink = *(*byte)(unsafe.Add(nil, w.window+5*page))
	present := residentPages(t, w.window, 16)
	return countTrue(present), present[5]
}

// probeSink keeps the probing read from being optimized away.
var probeSink byte

// residentPages reads the present bit (63) of n pages from addr in
// /proc/self/pagemap.
func residentPages(t *testing.T, addr uintptr, n int) []bool {
	pm, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	buf := make([]byte, 8*n)
	if _, err := pm.ReadAt(buf, int64(addr/4096*8)); err != nil {
		t.Fatal(err)
	}
	out := make([]bool, n)
	for i := range out {
		out[i] = binary.LittleEndian.Uint64(buf[8*i:])&(1<<63) != 0
	}
	return out
}

func countTrue(bs []bool) (n int) {
	for _, b := range bs {
		if b {
			n++
		}
	}
	return n
}

func executableVMAs(t *testing.T) int {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 6 && fields[5] == exe && !strings.Contains(fields[1], "w") {
			n++
		}
	}
	return n
}

// kernelAtLeast reports whether the running kernel's release is at least
// major.minor.
func kernelAtLeast(t *testing.T, major, minor int) bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var ma, mi int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &ma, &mi); err != nil {
		t.Fatalf("kernel release %q: %v", unix.ByteSliceToString(u.Release[:]), err)
	}
	return ma > major || ma == major && mi >= minor
}

// probeUserfaultfd asks for a userfaultfd as disableFaultAround does
// (flags O_CLOEXEC|UFFD_USER_MODE_ONLY) and closes it: the error is
// userfaultfd(2)'s own, EPERM where a seccomp profile refuses it.
func probeUserfaultfd() error {
	const userModeOnly = 1 // UFFD_USER_MODE_ONLY
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|userModeOnly, 0, 0)
	if errno != 0 {
		return errno
	}
	unix.Close(int(fd))
	return nil
}

// TestConfinedGauge: the proxy role's /metrics says whether the trim
// left fault-around off: 1 where userfaultfd takes (Linux 6.7+, allowed
// here), 0 with --confine-executable-faults=false.
// TestBinaryFallsBackUnderSeccomp checks the 0 under a refusal.
func TestConfinedGauge(t *testing.T) {
	want := "0"
	if kernelAtLeast(t, 6, 7) && probeUserfaultfd() == nil {
		want = "1"
	}
	for _, c := range []struct {
		name, flag, want string
	}{
		{"default", "--confine-executable-faults=true", want},
		{"off", "--confine-executable-faults=false", "0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv("WRIT_JOIN_TOKEN", "token")
			adminAddr := freeAddr(t)
			ctx, cancel := context.WithCancel(context.Background())
			var stderr syncbuf.Buffer
			done := make(chan int, 1)
			go func() {
				done <- run(ctx, []string{
					"--control-plane", freeAddr(t), // nothing listens: the agent keeps retrying
					"--trust-bundle", writeBundle(t),
					"--trust-domain", "example.org",
					"--workload-api", "unix://" + filepath.Join(t.TempDir(), "agent.sock"),
					"--admin-addr", adminAddr,
					"--http-proxy", freeAddr(t),
					c.flag,
				}, io.Discard, &stderr)
			}()
			defer func() {
				cancel()
				select {
				case <-done:
				case <-time.After(30 * time.Second):
					t.Error("writ-proxy did not stop after cancellation")
				}
			}()
			waitHTTP(t, "http://"+adminAddr+"/healthz", http.StatusOK)
			if got := gaugeValue(t, "http://"+adminAddr+"/metrics", "writ_executable_faults_confined"); got != c.want {
				t.Fatalf("writ_executable_faults_confined %s, want %s; log:\n%s", got, c.want, stderr.String())
			}
		})
	}
}

// gaugeValue reads an unlabelled metric's value from a Prometheus text
// exposition.
func gaugeValue(t *testing.T, url, name string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: status %d", url, resp.StatusCode)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return v
		}
	}
	t.Fatalf("no %s in %s", name, url)
	return ""
}

// envStdinClosedProbe: "1" makes TestTrimWithStdinClosed run its probe.
const envStdinClosedProbe = "WRIT_TEST_STDIN_CLOSED_PROBE"

// TestTrimWithStdinClosed re-executes the test binary, which closes its
// stdin (as some supervisors start a daemon) so that the userfaultfd is
// descriptor 0, and trims twice: both trims must leave fault-around off,
// the second re-registering on the same userfaultfd rather than taking
// descriptor 0 for "none yet" and opening another, which the kernel
// refuses for mappings the first one holds.
func TestTrimWithStdinClosed(t *testing.T) {
	if os.Getenv(envStdinClosedProbe) == "1" {
		probeTrimWithStdinClosed(t)
		return
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestTrimWithStdinClosed$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), envStdinClosedProbe+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child with stdin closed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "--- PASS: TestTrimWithStdinClosed") {
		t.Fatalf("the child did not run the probe:\n%s", out)
	}
}

func probeTrimWithStdinClosed(t *testing.T) {
	want := kernelAtLeast(t, 6, 7)
	if want {
		if err := probeUserfaultfd(); err != nil {
			t.Fatalf("userfaultfd(2) refused by this environment: %v; see TestTrimConfinesFaultAround", err)
		}
	}
	if err := unix.Close(0); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, confined := trimExecutablePages(trimMode{noFaultAround: true}); confined != want {
			t.Fatalf("trim %d with stdin closed: fault-around off %v, want %v", i, confined, want)
		}
		if i == 0 && want {
			if l, err := os.Readlink("/proc/self/fd/0"); err != nil || !strings.Contains(l, "userfaultfd") {
				t.Fatalf("descriptor 0 is %q (%v), not the userfaultfd: the probe does not test what it means to", l, err)
			}
		}
	}
}
