package saferegex

import (
	"strings"
	"testing"
)

func TestCompile(t *testing.T) {
	tests := []struct {
		name, pattern, err string
		match, miss        string
	}{
		{name: "anchored", pattern: "/items/[0-9]+", match: "/items/42", miss: "/x/items/42"},
		{name: "alternation anchored as a whole", pattern: "/a|/b", match: "/b", miss: "/bc"},
		{name: "at the length bound", pattern: "/" + strings.Repeat("a", MaxLen-1), match: "/" + strings.Repeat("a", MaxLen-1)},
		{name: "over the length bound", pattern: "/" + strings.Repeat("a", MaxLen), err: "regex is 1025 bytes, more than 1024"},
		{name: "syntax", pattern: "/a(b", err: `regex "/a(b": missing closing )`},
		{name: "repeat over regexp's cap", pattern: "a{1001}", err: `regex "a{1001}": invalid repeat count`},
		{name: "program over the bound", pattern: "[a-z]{1000}[0-9]{1000}x{1000}y{1000}z{1000}", err: "compiles to 5004 instructions, more than 4096"},
		{name: "backreference (not RE2)", pattern: `(a)\1`, err: "invalid escape sequence"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			re, err := Compile(tt.pattern)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("got %v, want an error containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.match != "" && !re.MatchString(tt.match) {
				t.Errorf("%q does not match %q", tt.pattern, tt.match)
			}
			if tt.miss != "" && re.MatchString(tt.miss) {
				t.Errorf("%q matches %q", tt.pattern, tt.miss)
			}
		})
	}
}
