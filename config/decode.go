// Package config owns Writ's declarative configuration: the strict YAML
// decoding every Writ file goes through, writd's own server configuration,
// and (later) the mesh resources.
//
// It imports only the standard library and a YAML parser, so every other
// package may import it.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// FieldError is a problem with one field of a configuration file.
type FieldError struct {
	File  string
	Line  int    // 0 when unknown
	Field string // dotted path, e.g. "ca.svid_default_ttl"
	Msg   string
}

func (e *FieldError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Field != "" {
		fmt.Fprintf(&b, ": %s", e.Field)
	}
	fmt.Fprintf(&b, ": %s", e.Msg)
	return b.String()
}

// Errors is every problem found in one file, in file order.
type Errors []*FieldError

func (es Errors) Error() string {
	parts := make([]string, len(es))
	for i, e := range es {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "\n")
}

// Validator is implemented by configuration types that check their values
// after decoding. Field paths in the returned errors are dotted YAML keys;
// Decode fills in the file and line.
type Validator interface {
	Validate() []*FieldError
}

var (
	lineRE    = regexp.MustCompile(`line (\d+): (.*)`)
	unknownRE = regexp.MustCompile(`^field (\S+) not found`)
)

// Decode parses one YAML document from data into v strictly: unknown keys,
// a second document or trailing content, and values of the wrong type are
// errors that name the file, line and field. If v implements Validator its
// findings are returned the same way. v is left unspecified on error.
func Decode(file string, data []byte, v any) error {
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil {
		if errors.Is(err, io.EOF) {
			return Errors{{File: file, Msg: "empty document"}}
		}
		return fromYAMLError(file, nil, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		line := extra.Line
		if err != nil {
			return fromYAMLError(file, nil, err)
		}
		return Errors{{File: file, Line: line, Msg: "unexpected second document: one document per file"}}
	}
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(true)
	if err := strict.Decode(v); err != nil {
		return fromYAMLError(file, &root, err)
	}
	if val, ok := v.(Validator); ok {
		if errs := val.Validate(); len(errs) > 0 {
			for _, e := range errs {
				e.File = file
				if e.Line == 0 {
					e.Line = lineOf(&root, e.Field)
				}
			}
			return Errors(errs)
		}
	}
	return nil
}

// fromYAMLError turns yaml.v3's "line N: msg" errors into FieldErrors,
// naming the field that sits on that line.
func fromYAMLError(file string, root *yaml.Node, err error) error {
	var te *yaml.TypeError
	msgs := []string{err.Error()}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	var out Errors
	for _, m := range msgs {
		m = strings.TrimPrefix(m, "yaml: ")
		fe := &FieldError{File: file, Msg: m}
		if sm := lineRE.FindStringSubmatch(m); sm != nil {
			fe.Line, _ = strconv.Atoi(sm[1])
			fe.Msg = sm[2]
			if root != nil {
				fe.Field = fieldAt(root, fe.Line, "")
				// In a flow mapping several keys share a line: name the
				// unknown one itself.
				if um := unknownRE.FindStringSubmatch(fe.Msg); um != nil {
					if f := fieldAt(root, fe.Line, um[1]); f != "" {
						fe.Field = f
					}
				}
			}
		}
		out = append(out, fe)
	}
	return out
}

// fieldAt returns the dotted path of the mapping key on the given line
// (named key, when not empty).
func fieldAt(n *yaml.Node, line int, key string) string {
	var walk func(n *yaml.Node, path string) string
	walk = func(n *yaml.Node, path string) string {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				if p := walk(c, path); p != "" {
					return p
				}
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, val := n.Content[i], n.Content[i+1]
				p := join(path, k.Value)
				if k.Line == line && (key == "" || k.Value == key) {
					return p
				}
				if r := walk(val, p); r != "" {
					return r
				}
			}
		case yaml.SequenceNode:
			for i, c := range n.Content {
				p := fmt.Sprintf("%s[%d]", path, i)
				if c.Line == line && c.Kind == yaml.ScalarNode {
					return p
				}
				if r := walk(c, p); r != "" {
					return r
				}
			}
		}
		return ""
	}
	return walk(n, "")
}

// lineOf finds the line of a dotted field path, or of its nearest existing
// parent (a missing required field is reported at its parent).
func lineOf(root *yaml.Node, field string) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := n.Line
	for _, part := range splitPath(field) {
		if n.Kind == yaml.SequenceNode {
			i, err := strconv.Atoi(part)
			if err != nil || i < 0 || i >= len(n.Content) {
				return line
			}
			n = n.Content[i]
			line = n.Line
			continue
		}
		if n.Kind != yaml.MappingNode {
			return line
		}
		found := false
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == part {
				line = n.Content[i].Line
				n = n.Content[i+1]
				found = true
				break
			}
		}
		if !found {
			return line
		}
	}
	return line
}

func splitPath(p string) []string {
	var out []string
	for _, seg := range strings.Split(p, ".") {
		for seg != "" {
			i := strings.IndexByte(seg, '[')
			if i < 0 {
				out = append(out, seg)
				break
			}
			if i > 0 {
				out = append(out, seg[:i])
			}
			j := strings.IndexByte(seg, ']')
			if j < i {
				break
			}
			out = append(out, seg[i+1:j])
			seg = seg[j+1:]
		}
	}
	return out
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// Duration is a time.Duration written as Go duration text ("90s", "1h").
type Duration time.Duration

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: want a duration such as 90s or 1h", n.Line)}}
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is not a duration (use forms such as 90s, 15m, 1h)", n.Line, n.Value)}}
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML implements yaml.Marshaler.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }
