package enforcer

import (
	"strconv"
	"unicode/utf8"
)

// appendRequestAttrs appends the canonical JSON of a request event's
// attributes (requestAttrs with headers as sorted pairs) to b, without
// reflection or maps: the enforcer encodes one per request. It reports
// false when a string holds a NUL or invalid UTF-8, which the canonical
// form rewrites; the caller then takes the general path.
// TestRequestAttributesAreCanonical holds both paths to
// audit.CanonicalJSON.
func appendRequestAttrs(b []byte, a *requestAttrs, headers [][2]string) ([]byte, bool) {
	ok := true
	str := func(s string) {
		var good bool
		b, good = appendJSONString(b, s)
		ok = ok && good
	}
	strs := func(l []string) {
		b = append(b, '[')
		for i, s := range l {
			if i > 0 {
				b = append(b, ',')
			}
			str(s)
		}
		b = append(b, ']')
	}
	b = append(b, '{')
	// Keys in sorted order, as requestAttrs declares them.
	if a.Cached {
		b = append(b, `"cached":true,`...)
	}
	if d := a.DryRun; d != nil {
		b = append(b, `"dry_run":{"disagrees":`...)
		b = strconv.AppendBool(b, d.Disagrees)
		b = append(b, `,"http_status":`...)
		b = strconv.AppendInt(b, int64(d.HTTPStatus), 10)
		if len(d.MatchedRules) > 0 {
			b = append(b, `,"matched_rules":`...)
			strs(d.MatchedRules)
		}
		b = append(b, `,"policy_revision":`...)
		str(d.PolicyRevision)
		b = append(b, `,"reason":`...)
		str(d.Reason)
		b = append(b, `,"result":`...)
		str(d.Result)
		b = append(b, "},"...)
	}
	if a.GRPC {
		b = append(b, `"grpc":true,`...)
	}
	if len(headers) > 0 {
		b = append(b, `"headers":{`...)
		for i, h := range headers {
			if i > 0 {
				b = append(b, ',')
			}
			str(h[0])
			b = append(b, ':')
			str(h[1])
		}
		b = append(b, "},"...)
	}
	if a.Host != "" {
		b = append(b, `"host":`...)
		str(a.Host)
		b = append(b, ',')
	}
	b = append(b, `"latency_us":`...)
	b = strconv.AppendInt(b, a.LatencyUS, 10)
	if len(a.MatchedRules) > 0 {
		b = append(b, `,"matched_rules":`...)
		strs(a.MatchedRules)
	}
	b = append(b, `,"mtls":`...)
	b = strconv.AppendBool(b, a.MTLS)
	if a.PeerCertNotAfter != "" {
		b = append(b, `,"peer_cert_not_after":`...)
		str(a.PeerCertNotAfter)
	}
	b = append(b, `,"protocol":`...)
	str(a.Protocol)
	b = append(b, `,"raw_path":`...)
	str(a.RawPath)
	return append(b, '}'), ok
}

const hexDigits = "0123456789abcdef"

// appendJSONString quotes s as encoding/json does without HTML escaping
// (short escapes for \b \f \n \r \t " \, \u00XX for other controls,
// U+2028 and U+2029 escaped). It reports false for a NUL or invalid
// UTF-8, whose canonical spelling differs.
func appendJSONString(b []byte, s string) ([]byte, bool) {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			if c == 0 {
				return b, false
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			return b, false
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"'), true
}
