package main

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// trimExecutablePages drops this process's mappings of its own
// executable's read-only pages (code and constant data, never written, so
// re-read from the file on the next touch). Start-up runs the package
// initializers of OPA, gRPC and the Envoy protobuf types, and the kernel
// maps 64 KiB of the file around each touched page: about 25 MiB of the
// binary ends up resident, most of it never used again. The pages stay
// in the page cache; those the proxy needs come back on their first use
// (a minor fault). Writable mappings are left alone. It returns the bytes
// of mappings advised.
func trimExecutablePages() int64 {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0
	}
	defer f.Close()
	var total int64
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
		if madvise(uintptr(lo), uintptr(hi-lo), syscall.MADV_DONTNEED) == nil {
			total += int64(hi - lo)
		}
	}
	return total
}

func madvise(addr, length uintptr, advice int) error {
	_, _, errno := syscall.Syscall(syscall.SYS_MADVISE, addr, length, uintptr(advice))
	if errno != 0 {
		return errno
	}
	return nil
}
