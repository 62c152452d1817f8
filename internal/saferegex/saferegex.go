// Package saferegex holds the one bound on the RE2 patterns of routes and
// header matches, shared by the mesh config's validation (which refuses a
// pattern at apply time) and writ-proxy (which NACKs one it is sent), so
// that the two cannot drift apart: a pattern writd accepts is one every
// sidecar accepts. Anyone may import it.
package saferegex

import (
	"errors"
	"fmt"
	"regexp"
	"regexp/syntax"
)

// MaxLen bounds a pattern's length in bytes and MaxInst its compiled
// program. Go's regexp (RE2) matches in linear time, so the bound that
// matters is the size of the program, which grows with the pattern and
// with counted repetitions (which regexp caps at 1000 each).
const (
	MaxLen  = 1024
	MaxInst = 4096
)

// Compile compiles pattern anchored at both ends, as Envoy's safe_regex
// matches the whole value, refusing patterns longer than MaxLen or whose
// program exceeds MaxInst instructions. Its errors name the pattern (or
// its size) but not the field: callers add that.
func Compile(pattern string) (*regexp.Regexp, error) {
	if len(pattern) > MaxLen {
		return nil, fmt.Errorf("regex is %d bytes, more than %d", len(pattern), MaxLen)
	}
	anchored := `^(?:` + pattern + `)$`
	re, err := syntax.Parse(anchored, syntax.Perl)
	if err != nil {
		// Name what is wrong, not the anchored form the user never wrote.
		var se *syntax.Error
		if errors.As(err, &se) {
			return nil, fmt.Errorf("regex %q: %s", pattern, se.Code)
		}
		return nil, fmt.Errorf("regex %q: %w", pattern, err)
	}
	prog, err := syntax.Compile(re.Simplify())
	if err != nil {
		return nil, fmt.Errorf("regex %q: %w", pattern, err)
	}
	if n := len(prog.Inst); n > MaxInst {
		return nil, fmt.Errorf("regex %q compiles to %d instructions, more than %d", pattern, n, MaxInst)
	}
	return regexp.Compile(anchored)
}
