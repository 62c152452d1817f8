package test

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// coldExecutable drops exe's pages from the page cache, so a benchmark
// starts it as it would run after an install or a reboot: read from
// disk. A binary the linker has just written sits in the cache as it was
// written, and the writ-proxy processes started from it were measured at
// 1.5–2 MiB more resident (file-backed) per process for several minutes
// than from the same file read back from disk (docs/proxy.md). Failing to
// drop them only costs that accuracy, so errors are logged, not fatal.
func coldExecutable(tb testing.TB, exe string) {
	f, err := os.Open(exe)
	if err != nil {
		tb.Logf("page cache of %s kept: %v", exe, err)
		return
	}
	defer f.Close()
	// Dirty pages are not dropped: write them out first.
	if err := f.Sync(); err != nil {
		tb.Logf("page cache of %s kept: %v", exe, err)
		return
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		tb.Logf("page cache of %s kept: %v", exe, err)
	}
}
