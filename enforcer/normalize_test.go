package enforcer

import (
	"errors"
	"strings"
	"testing"
)

func TestNormalizePath(t *testing.T) {
	tests := []struct {
		name, in, path, query string
		bad                   bool
	}{
		{"root", "/", "/", "", false},
		{"plain", "/api/v1/users", "/api/v1/users", "", false},
		{"query kept raw", "/a?b=%2F&c=..", "/a", "b=%2F&c=..", false},
		{"fragment dropped", "/a/b#frag", "/a/b", "", false},
		{"trailing slash kept", "/a/b/", "/a/b/", "", false},
		{"merge slashes", "//a///b//", "/a/b/", "", false},
		{"dot", "/a/./b", "/a/b", "", false},
		{"dot dot", "/a/b/../c", "/a/c", "", false},
		{"dot dot above root", "/../../a", "/a", "", false},
		{"trailing dot dot", "/a/b/..", "/a/", "", false},
		{"trailing dot", "/a/.", "/a/", "", false},
		{"only dot dot", "/..", "/", "", false},
		{"dots in names stay", "/a/..b/.c/d.", "/a/..b/.c/d.", "", false},
		{"encoded dot dot", "/admin/%2e%2E/public", "/public", "", false},
		{"encoded dots escaping admin", "/public/%2e%2e/admin", "/admin", "", false},
		{"encoded unreserved", "/%61%62%7E%5f%2D", "/ab~_-", "", false},
		{"reserved stays encoded upper", "/a%3fb%3Ac%20", "/a%3Fb%3Ac%20", "", false},
		{"percent stays", "/100%25", "/100%25", "", false},
		{"double encoded slash stays", "/a%252Fb", "/a%252Fb", "", false},
		{"slashes then dots", "/a//..//b", "/b", "", false},
		{"utf8", "/caf\u00e9", "/caf\u00e9", "", false},
		{"encoded slash", "/a%2Fb", "", "", true},
		{"encoded slash lower", "/a%2fb", "", "", true},
		{"encoded backslash", "/a%5Cb", "", "", true},
		{"backslash", "/a\\b", "", "", true},
		{"encoded NUL", "/a%00", "", "", true},
		{"NUL", "/a\x00", "", "", true},
		{"NUL in query", "/a?x=\x00", "", "", true},
		{"control", "/a\nb", "", "", true},
		{"truncated escape", "/a%2", "", "", true},
		{"bad hex", "/a%zz", "", "", true},
		{"relative", "a/b", "", "", true},
		{"empty", "", "", "", true},
		{"absolute form", "http://x/a", "", "", true},
		{"asterisk", "*", "", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path, query, err := NormalizePath(tt.in)
			if tt.bad {
				if err == nil || !errors.Is(err, ErrBadPath) {
					t.Fatalf("NormalizePath(%q) = %q, %v; want ErrBadPath", tt.in, path, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("NormalizePath(%q): %v", tt.in, err)
			}
			if path != tt.path || query != tt.query {
				t.Fatalf("NormalizePath(%q) = %q, %q; want %q, %q", tt.in, path, query, tt.path, tt.query)
			}
			checkNormalized(t, tt.in, path)
		})
	}
}

// checkNormalized fails unless p is in the form NormalizePath promises.
func checkNormalized(t *testing.T, in, p string) {
	t.Helper()
	if !strings.HasPrefix(p, "/") {
		t.Fatalf("%q -> %q: not absolute", in, p)
	}
	if strings.Contains(p, "//") {
		t.Fatalf("%q -> %q: empty segment", in, p)
	}
	for _, s := range strings.Split(p[1:], "/") {
		if s == "." || s == ".." {
			t.Fatalf("%q -> %q: dot segment", in, p)
		}
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		if c < 0x20 || c == 0x7f || c == '\\' || c == '?' || c == '#' {
			t.Fatalf("%q -> %q: byte %q", in, p, c)
		}
		if c == '%' {
			if i+2 >= len(p) {
				t.Fatalf("%q -> %q: truncated escape", in, p)
			}
			hi, ok1 := unhex(p[i+1])
			lo, ok2 := unhex(p[i+2])
			d := hi<<4 | lo
			if !ok1 || !ok2 || isUnreserved(d) || d == '/' || d == '\\' || d == 0 ||
				strings.ToUpper(p[i+1:i+3]) != p[i+1:i+3] {
				t.Fatalf("%q -> %q: escape %q not normalized", in, p, p[i:i+3])
			}
		}
	}
	again, _, err := NormalizePath(p)
	if err != nil || again != p {
		t.Fatalf("%q -> %q -> %q, %v: not a fixed point", in, p, again, err)
	}
}

func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{"/", "/a/./b/../c", "//a//b", "/%2e%2E/x", "/a%2Fb", "/a?b#c", "/%41%7e%3a", "/..", "/a/b/..", "/x/%252e%252e/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		p, q, err := NormalizePath(in)
		if err != nil {
			if !errors.Is(err, ErrBadPath) {
				t.Fatalf("error %v does not wrap ErrBadPath", err)
			}
			return
		}
		checkNormalized(t, in, p)
		if strings.IndexByte(q, 0) >= 0 {
			t.Fatalf("%q: NUL reached the query %q", in, q)
		}
	})
}
