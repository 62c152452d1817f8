package audit

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// Redaction says what of a request may be kept in an event's attributes.
// Only headers on the allowlist are kept; everything else a request
// carried (other headers, bodies, query values) is dropped, so secrets
// never reach the audit trail unless an operator lists them. It is safe for
// concurrent use once built.
type Redaction struct {
	allow map[string]bool
}

// DefaultAllowedHeaders are kept when no allowlist is configured: none of
// them carries credentials.
var DefaultAllowedHeaders = []string{"user-agent", "x-request-id", "content-type", "traceparent"}

// NewRedaction returns a Redaction keeping the named headers
// (case-insensitive). Names that can carry credentials are refused, so a
// configuration mistake cannot put tokens in the trail.
func NewRedaction(headers []string) (*Redaction, error) {
	r := &Redaction{allow: map[string]bool{}}
	for _, h := range headers {
		h = strings.ToLower(strings.TrimSpace(h))
		switch h {
		case "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key":
			return nil, fmt.Errorf("redaction: header %q carries credentials and cannot be kept", h)
		case "":
			return nil, fmt.Errorf("redaction: empty header name")
		}
		r.allow[h] = true
	}
	return r, nil
}

// Headers returns the allowed subset of h with lower-cased names.
func (r *Redaction) Headers(h map[string]string) map[string]any {
	if r == nil || len(h) == 0 {
		return nil
	}
	out := map[string]any{}
	for k, v := range h {
		if lk := strings.ToLower(k); r.allow[lk] {
			out[lk] = v
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// AppendHeaders appends the kept headers of h to dst as lower-case
// name/value pairs sorted by name: Headers without the map, for
// recorders that encode attributes themselves.
func (r *Redaction) AppendHeaders(dst [][2]string, h map[string]string) [][2]string {
	if r == nil {
		return dst
	}
	start := len(dst)
	for k, v := range h {
		if lk := strings.ToLower(k); r.allow[lk] {
			dst = append(dst, [2]string{lk, v})
		}
	}
	kept := dst[start:]
	slices.SortFunc(kept, func(a, b [2]string) int { return strings.Compare(a[0], b[0]) })
	// Two spellings of one name (a map keyed by what was sent): keep one,
	// as Headers' map does.
	return append(dst[:start], slices.CompactFunc(kept, func(a, b [2]string) bool { return a[0] == b[0] })...)
}

// Attributes returns the canonical JSON of attrs (see CanonicalJSON), for
// recorders that build attributes from Go values.
func Attributes(attrs map[string]any) (json.RawMessage, error) {
	if len(attrs) == 0 {
		return emptyObject, nil
	}
	return canonicalValue(attrs)
}
