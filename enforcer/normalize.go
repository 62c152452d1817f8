package enforcer

import (
	"errors"
	"strings"
)

// ErrBadPath is wrapped by every path NormalizePath refuses. The enforcer
// answers such requests with 400 before any policy runs.
var ErrBadPath = errors.New("bad request path")

type pathError struct{ reason string }

func (e *pathError) Error() string { return "bad request path: " + e.reason }
func (e *pathError) Unwrap() error { return ErrBadPath }

// NormalizePath splits an HTTP request target into its normalized path and
// its raw query, so that a policy matching on the path cannot be bypassed by
// spelling the same resource differently. In order it:
//   - refuses anything but an origin-form target ("/..."), control
//     characters, a backslash in any form, an encoded slash (%2F), an
//     encoded NUL and malformed percent escapes;
//   - decodes percent-encoded unreserved characters (A-Z a-z 0-9 - . _ ~)
//     and upper-cases the hex digits of every other escape (RFC 3986 6.2.2);
//   - merges runs of slashes;
//   - removes "." and ".." segments (RFC 3986 5.2.4), never above the root.
//
// The fragment, if a client sent one, is dropped. The query is returned as
// sent, minus the "?". The result is a fixed point: normalizing it again
// returns it unchanged. Safe for concurrent use.
func NormalizePath(target string) (path, query string, err error) {
	if i := strings.IndexByte(target, '#'); i >= 0 {
		target = target[:i]
	}
	rawPath := target
	if i := strings.IndexByte(target, '?'); i >= 0 {
		rawPath, query = target[:i], target[i+1:]
	}
	if strings.IndexByte(query, 0) >= 0 {
		return "", "", &pathError{"NUL in query"}
	}
	if rawPath == "" || rawPath[0] != '/' {
		return "", "", &pathError{"not an absolute path"}
	}
	decoded, err := decodeUnreserved(rawPath)
	if err != nil {
		return "", "", err
	}
	return removeDotSegments(mergeSlashes(decoded)), query, nil
}

func isUnreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

const upperHex = "0123456789ABCDEF"

func decodeUnreserved(p string) (string, error) {
	// Fast path: nothing to decode or refuse.
	clean := true
	for i := 0; i < len(p); i++ {
		if c := p[i]; c == '%' || c == '\\' || c < 0x20 || c == 0x7f {
			clean = false
			break
		}
	}
	if clean {
		return p, nil
	}
	var b strings.Builder
	b.Grow(len(p))
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c == '\\':
			return "", &pathError{"backslash in path"}
		case c < 0x20 || c == 0x7f:
			return "", &pathError{"control character in path"}
		case c != '%':
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(p) {
			return "", &pathError{"truncated percent escape"}
		}
		hi, ok1 := unhex(p[i+1])
		lo, ok2 := unhex(p[i+2])
		if !ok1 || !ok2 {
			return "", &pathError{"malformed percent escape"}
		}
		d := hi<<4 | lo
		switch {
		case d == '/':
			return "", &pathError{"encoded slash in path"}
		case d == '\\':
			return "", &pathError{"encoded backslash in path"}
		case d == 0:
			return "", &pathError{"encoded NUL in path"}
		case isUnreserved(d):
			b.WriteByte(d)
		default:
			b.WriteByte('%')
			b.WriteByte(upperHex[hi])
			b.WriteByte(upperHex[lo])
		}
		i += 2
	}
	return b.String(), nil
}

func mergeSlashes(p string) string {
	if !strings.Contains(p, "//") {
		return p
	}
	var b strings.Builder
	b.Grow(len(p))
	for i := 0; i < len(p); i++ {
		if p[i] == '/' && i > 0 && p[i-1] == '/' {
			continue
		}
		b.WriteByte(p[i])
	}
	return b.String()
}

// removeDotSegments works on a path that starts with "/" and has no empty
// segments. A trailing "." or ".." leaves a trailing slash, as RFC 3986 does.
func removeDotSegments(p string) string {
	if !strings.Contains(p, "/.") {
		return p
	}
	segs := strings.Split(p[1:], "/")
	out := make([]string, 0, len(segs))
	trailing := false
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case ".":
			trailing = last
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			trailing = last
		default:
			out = append(out, s)
			trailing = false
		}
	}
	r := "/" + strings.Join(out, "/")
	if trailing && len(out) > 0 {
		r += "/"
	}
	return r
}
