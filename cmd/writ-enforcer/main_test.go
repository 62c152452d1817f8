package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestFlags(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		code     int
		out, err string
	}{
		{"help", []string{"--help"}, 0, "--bundle-url", ""},
		{"no policy", []string{"--workload-api", "unix:///x"}, 2, "", "exactly one of --policy-dir"},
		{"two policies", []string{"--workload-api", "unix:///x", "--policy-dir", "p", "--bundle-file", "b"}, 2, "", "exactly one of"},
		{"no workload api", []string{"--policy-dir", "p"}, 2, "", "missing --workload-api"},
		{"stray argument", []string{"--policy-dir", "p", "extra"}, 2, "", "unexpected arguments"},
		{"gc percent too low", []string{"--workload-api", "unix:///x", "--policy-dir", "p", "--gc-percent", "1"}, 2, "", "--gc-percent"},
		{"bad level", []string{"--workload-api", "unix:///x", "--policy-dir", "p", "--log-level", "loud"}, 2, "", "--log-level"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("SPIFFE_ENDPOINT_SOCKET", "")
			var out, errb bytes.Buffer
			if got := run(context.Background(), tt.args, &out, &errb); got != tt.code {
				t.Fatalf("exit %d, want %d (stderr %q)", got, tt.code, errb.String())
			}
			if !strings.Contains(out.String(), tt.out) || !strings.Contains(errb.String(), tt.err) {
				t.Fatalf("stdout %q, stderr %q; want %q and %q", out.String(), errb.String(), tt.out, tt.err)
			}
		})
	}
}
