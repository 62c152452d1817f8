package policy

import (
	"strings"
	"unicode/utf8"

	"github.com/open-policy-agent/opa/v1/ast"
)

// simpleGlob matches the glob patterns RBAC policies are written with —
// literal text and "*" (any run of non-delimiter characters), with one
// ASCII delimiter or none ("**" too when there is none) — without OPA's
// glob.match, whose compiled-pattern cache lookup and general matcher were
// half the cost of a fast-path decision. With one delimiter a "*" cannot
// cross it, so pattern and subject split into the same number of segments
// and each pair is matched alone, in time linear in practice and at worst
// the product of the two lengths: no backtracking blow-up on hostile
// paths. Any other glob syntax is not simple and stays with OPA's builtin;
// FuzzSimpleGlob checks the two agree. Safe for concurrent use.
type simpleGlob struct {
	delim byte     // 0: none
	segs  []string // the pattern split at delim; "*" is the only wildcard
}

// compileSimpleGlob compiles glob.match's first two operands, or returns
// nil when the pattern is not simple.
func compileSimpleGlob(pattern, delimiters *ast.Term) *simpleGlob {
	p, ok := pattern.Value.(ast.String)
	if !ok || strings.ContainsAny(string(p), `?[]{}\!,`) || !utf8.ValidString(string(p)) {
		return nil
	}
	g := &simpleGlob{}
	switch d := delimiters.Value.(type) {
	case ast.Null:
	case *ast.Array:
		switch d.Len() {
		case 0:
			g.delim = '.' // glob.match's default
		case 1:
			s, ok := d.Elem(0).Value.(ast.String)
			if !ok || len(s) != 1 || s[0] >= 0x80 || s[0] == '*' {
				return nil
			}
			g.delim = s[0]
		default:
			return nil
		}
	default:
		return nil
	}
	if g.delim == 0 {
		g.segs = []string{strings.ReplaceAll(string(p), "**", "*")}
		return g
	}
	if strings.Contains(string(p), "**") {
		return nil
	}
	g.segs = strings.Split(string(p), string(g.delim))
	return g
}

// match reports whether s, valid UTF-8, matches the whole pattern.
func (g *simpleGlob) match(s string) bool {
	if g.delim == 0 {
		return wildcardMatch(g.segs[0], s)
	}
	for i, seg := range g.segs {
		j := strings.IndexByte(s, g.delim)
		if i == len(g.segs)-1 {
			return j < 0 && wildcardMatch(seg, s)
		}
		if j < 0 || !wildcardMatch(seg, s[:j]) {
			return false
		}
		s = s[j+1:]
	}
	return false
}

// wildcardMatch matches s against p, where "*" matches any run of bytes,
// by the usual greedy scan that returns to the last star on a mismatch.
// Bytes and runes agree here: a literal never matches from the middle of
// a UTF-8 sequence.
func wildcardMatch(p, s string) bool {
	pi, si, star, mark := 0, 0, -1, 0
	for si < len(s) {
		switch {
		case pi < len(p) && p[pi] == '*':
			star, mark = pi, si
			pi++
		case pi < len(p) && p[pi] == s[si]:
			pi++
			si++
		case star >= 0:
			pi = star + 1
			mark++
			si = mark
		default:
			return false
		}
	}
	for pi < len(p) && p[pi] == '*' {
		pi++
	}
	return pi == len(p)
}
