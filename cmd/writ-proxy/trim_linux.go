package main

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// trimExecutablePages drops this process's mappings of its own
// executable's read-only pages (code and constant data, never written, so
// re-read from the file on the next touch). Start-up runs the package
// initializers of OPA, gRPC and the Envoy protobuf types, and the kernel
// maps 64 KiB of the file around each touched page: about 25 MiB of the
// binary ends up resident, most of it never used again. The pages stay
// in the page cache; those the proxy needs come back on their first use
// (a minor fault). Writable mappings are left alone. With
// mode.noFaultAround the kernel is then asked not to fault around in
// these mappings (disableFaultAround); with mode.split the mappings are
// cut into one-page pieces instead (splitMapping). It returns the bytes
// of mappings advised, and whether fault-around is confined to the
// touched page in all of them.
func trimExecutablePages(mode trimMode) (int64, bool) {
	var total int64
	confined := true
	for _, r := range executableMappings() {
		if madvise(r.lo, r.hi-r.lo, syscall.MADV_DONTNEED) != nil {
			confined = false
			continue
		}
		total += int64(r.hi - r.lo)
		switch {
		case mode.split:
			splitMapping(r.lo, r.hi)
		case !mode.noFaultAround || !disableFaultAround(r.lo, r.hi):
			confined = false
		}
	}
	return total, confined && total > 0
}

// splitMapping cuts [lo, hi) into one-page VMAs. On a page fault in a
// file mapping the kernel also maps the cached pages around the faulting
// one ("fault-around", 64 KiB by default, system-wide), but never beyond
// the VMA. What the steady state touches of the executable — the code of
// the request path, and the function metadata (pclntab) and type data
// that every GC reads for the functions on goroutine stacks and the
// objects in the heap — is a few hundred scattered pages; 64 KiB around
// each made it 10-17 MiB resident, against 3-5 MiB page by page. VMAs
// whose flags differ are not merged again, and VM_DONTDUMP is a flag that
// changes nothing else here: file-backed read-only mappings are left out
// of core dumps anyway (coredump_filter), except the ELF header page,
// which keeps its flag since pages at even page numbers are left alone
// (the executable's first page is 4 MiB-aligned). The price: a VMA per
// page in the kernel (about 200 bytes each: ~2 MiB for a 50 MB binary,
// well within vm.max_map_count), and one minor fault per page touched
// instead of one per 16.
func splitMapping(lo, hi uintptr) {
	page := uintptr(os.Getpagesize()) // 4 KiB, or 16/64 KiB on some arm64 kernels
	for a := lo&^(page-1) | page; a < hi; a += 2 * page {
		_ = madvise(a, page, unix.MADV_DONTDUMP)
	}
}

type addrRange struct{ lo, hi uintptr }

// executableMappings lists this process's read-only mappings of its own
// executable, adjacent ones joined (a split mapping reads back as
// thousands of lines).
func executableMappings() []addrRange {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return nil
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return nil
	}
	defer f.Close()
	var rs []addrRange
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// start-end perms offset dev inode path
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[5] != exe || strings.Contains(fields[1], "w") {
			continue
		}
		start, end, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		lo, err1 := strconv.ParseUint(start, 16, 64)
		hi, err2 := strconv.ParseUint(end, 16, 64)
		if err1 != nil || err2 != nil || hi <= lo {
			continue
		}
		if n := len(rs); n > 0 && rs[n-1].hi == uintptr(lo) {
			rs[n-1].hi = uintptr(hi)
			continue
		}
		rs = append(rs, addrRange{uintptr(lo), uintptr(hi)})
	}
	return rs
}

func madvise(addr, length uintptr, advice int) error {
	_, _, errno := syscall.Syscall(syscall.SYS_MADVISE, addr, length, uintptr(advice))
	if errno != 0 {
		return errno
	}
	return nil
}
