//go:build linux && !(amd64 || arm64 || riscv64 || loong64 || 386 || arm || s390x)

package main

import "errors"

// disableFaultAround is not wired up where the ioctl numbers differ from
// the generic encoding; splitMapping is the way there.
func disableFaultAround(lo, hi uintptr) bool { return false }

func faultAroundRefusal() error {
	return errors.New("userfaultfd not wired up on this architecture")
}
