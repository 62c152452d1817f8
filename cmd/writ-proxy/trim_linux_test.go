package main

import (
	"bufio"
	"debug/elf"
	"encoding/binary"
	"os"
	"strings"
	"testing"
	"unsafe"
)

// TestSplitConfinesFaultAround touches one page of the executable's
// function-name table (read only to print stack traces, so nothing else
// in the test brings it in) after a trim, and counts the resident pages
// of the 64 KiB around it: with the mappings split page by page, the
// kernel's fault-around maps the touched page alone.
func TestSplitConfinesFaultAround(t *testing.T) {
	const page = 4096
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
	probe := window + 5*page

	touchAndCount := func(split bool) (int, bool) {
		trimExecutablePages(split)
		probeSink = *(*byte)(unsafe.Add(nil, probe))
		present := residentPages(t, window, 16)
		return countTrue(present), present[5]
	}
	n, _ := touchAndCount(false)
	t.Logf("without the split: %d of the 16 pages around a touched one resident", n)
	n, probed := touchAndCount(true)
	if !probed || n > 2 {
		t.Fatalf("with the split: %d of the 16 pages around a touched one resident (touched one resident: %v), want it alone", n, probed)
	}
	if vmas := executableVMAs(t); vmas < 1000 {
		t.Fatalf("%d read-only mappings of the executable after the split, want one per page", vmas)
	}
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
