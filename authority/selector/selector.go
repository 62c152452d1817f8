// Package selector parses and matches workload selectors ("unix:uid:1000"),
// the facts about a workload that registration entries are keyed on.
//
// Safe for concurrent use: every value is immutable.
package selector

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Selector is one "type:key:value" fact about a workload.
type Selector struct {
	Type  string // "unix"
	Key   string // "uid", "gid", "user", "group", "path"
	Value string
}

// MaxLen bounds a selector's text; selectors come from the admin API.
const MaxLen = 1024

func (s Selector) String() string { return s.Type + ":" + s.Key + ":" + s.Value }

// Parse reads and validates "type:key:value". The only type today is unix,
// whose keys are uid and gid (decimal), user and group (names) and path
// (absolute path of the workload's binary).
func Parse(text string) (Selector, error) {
	if len(text) > MaxLen {
		return Selector{}, fmt.Errorf("selector longer than %d bytes", MaxLen)
	}
	typ, rest, ok := strings.Cut(text, ":")
	if !ok {
		return Selector{}, fmt.Errorf("selector %q: want type:key:value, e.g. unix:uid:1000", text)
	}
	key, value, ok := strings.Cut(rest, ":")
	if !ok || key == "" || value == "" {
		return Selector{}, fmt.Errorf("selector %q: want type:key:value, e.g. unix:uid:1000", text)
	}
	for _, r := range text {
		if r < 0x20 || r == 0x7f {
			return Selector{}, fmt.Errorf("selector %q: control characters are not allowed", text)
		}
	}
	s := Selector{Type: typ, Key: key, Value: value}
	switch typ {
	case "unix":
		switch key {
		case "uid", "gid":
			n, err := strconv.ParseUint(value, 10, 32)
			if err != nil || strconv.FormatUint(n, 10) != value {
				return Selector{}, fmt.Errorf("selector %q: %s must be a decimal number without leading zeros", text, key)
			}
		case "user", "group":
			if strings.ContainsAny(value, "/: ") {
				return Selector{}, fmt.Errorf("selector %q: %s must be a plain name", text, key)
			}
		case "path":
			if !strings.HasPrefix(value, "/") {
				return Selector{}, fmt.Errorf("selector %q: path must be absolute", text)
			}
		default:
			return Selector{}, fmt.Errorf("selector %q: unknown unix key %q (want uid, gid, user, group or path)", text, key)
		}
	default:
		return Selector{}, fmt.Errorf("selector %q: unknown type %q (want unix)", text, typ)
	}
	return s, nil
}

// ParseAll parses a list, rejecting duplicates, and returns it sorted so
// that equal sets compare equal.
func ParseAll(texts []string) ([]Selector, error) {
	if len(texts) == 0 {
		return nil, fmt.Errorf("at least one selector is required")
	}
	out := make([]Selector, 0, len(texts))
	seen := map[Selector]bool{}
	for _, t := range texts {
		s, err := Parse(t)
		if err != nil {
			return nil, err
		}
		if seen[s] {
			return nil, fmt.Errorf("selector %q given twice", t)
		}
		seen[s] = true
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Selector) int { return strings.Compare(a.String(), b.String()) })
	return out, nil
}

// Strings renders selectors as text.
func Strings(sels []Selector) []string {
	out := make([]string, len(sels))
	for i, s := range sels {
		out[i] = s.String()
	}
	return out
}

// Set is the selectors discovered for one workload.
type Set map[Selector]struct{}

// NewSet builds a Set.
func NewSet(sels ...Selector) Set {
	s := make(Set, len(sels))
	for _, x := range sels {
		s[x] = struct{}{}
	}
	return s
}

// Matches reports whether every selector an entry requires is among the
// workload's: an entry names the facts a workload must have, and a workload
// may have more. An entry with no selectors matches nothing.
func (s Set) Matches(required []Selector) bool {
	if len(required) == 0 {
		return false
	}
	for _, r := range required {
		if _, ok := s[r]; !ok {
			return false
		}
	}
	return true
}
