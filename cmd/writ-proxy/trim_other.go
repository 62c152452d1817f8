//go:build !linux

package main

// trimExecutablePages has nothing to do where the start-up pages cannot be
// dropped this way.
func trimExecutablePages(mode trimMode) (int64, bool) { return 0, false }

func faultAroundRefusal() error { return nil }
