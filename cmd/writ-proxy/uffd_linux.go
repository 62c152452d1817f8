//go:build linux && (amd64 || arm64 || riscv64 || loong64 || 386 || arm || s390x)

package main

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The userfaultfd ABI (linux/userfaultfd.h); the ioctl numbers are those
// of the generic _IOC encoding, hence the architectures above.
const (
	uffdAPI            = 0xAA
	uffdUserModeOnly   = 1       // UFFD_USER_MODE_ONLY: no CAP_SYS_PTRACE needed
	uffdFeatureWPAsync = 1 << 15 // UFFD_FEATURE_WP_ASYNC (Linux 6.7)
	uffdRegisterModeWP = 1 << 1
	uffdioAPI          = 0xc018aa3f // _IOWR(0xAA, 0x3F, struct uffdio_api)
	uffdioRegister     = 0xc020aa00 // _IOWR(0xAA, 0x00, struct uffdio_register)
)

type uffdioAPIArg struct{ api, features, ioctls uint64 }

type uffdioRegisterArg struct{ start, len, mode, ioctls uint64 }

var noFaultAround struct {
	sync.Mutex
	// opened says fd was asked for: 0 is a descriptor userfaultfd can
	// return when the proxy runs with its stdin closed.
	opened  bool
	fd      int   // the userfaultfd, -1 if refused; closing it would undo the registrations
	refusal error // why there is none, once asked
}

// disableFaultAround registers [lo, hi) with a userfaultfd in
// asynchronous write-protect mode, which the kernel never reports
// anything for (these mappings are read-only, and nothing is ever
// write-protected), but for which it does not fault around: a fault
// maps the one page it needs, as a VMA per page does, without the VMAs.
// It reports whether the kernel took it; on an older kernel, or where a
// seccomp profile refuses userfaultfd, it changes nothing.
func disableFaultAround(lo, hi uintptr) bool {
	noFaultAround.Lock()
	defer noFaultAround.Unlock()
	if !noFaultAround.opened {
		noFaultAround.opened = true
		fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK|uffdUserModeOnly, 0, 0)
		if errno != 0 {
			// EPERM from a seccomp profile (Docker's and the
			// Kubernetes RuntimeDefault answer that), ENOSYS from a
			// kernel built without it or a sandbox.
			noFaultAround.fd = -1
			noFaultAround.refusal = fmt.Errorf("userfaultfd: %w", errno)
			return false
		}
		api := uffdioAPIArg{api: uffdAPI, features: uffdFeatureWPAsync}
		if err := ioctl(int(fd), uffdioAPI, unsafe.Pointer(&api)); err != nil || api.features&uffdFeatureWPAsync == 0 {
			unix.Close(int(fd))
			noFaultAround.fd = -1
			noFaultAround.refusal = errors.New("userfaultfd: no UFFD_FEATURE_WP_ASYNC (Linux 6.7+)")
			return false
		}
		noFaultAround.fd = int(fd)
	}
	if noFaultAround.fd < 0 {
		return false
	}
	reg := uffdioRegisterArg{start: uint64(lo), len: uint64(hi - lo), mode: uffdRegisterModeWP}
	return ioctl(noFaultAround.fd, uffdioRegister, unsafe.Pointer(&reg)) == nil
}

// faultAroundRefusal says why disableFaultAround could not open its
// userfaultfd, or nil if it did or was never asked.
func faultAroundRefusal() error {
	noFaultAround.Lock()
	defer noFaultAround.Unlock()
	return noFaultAround.refusal
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg)); errno != 0 {
		return errno
	}
	return nil
}
