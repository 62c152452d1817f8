//go:build !linux

package test

import "testing"

// coldExecutable is a no-op off Linux (see pagecache_linux_test.go).
func coldExecutable(testing.TB, string) {}
