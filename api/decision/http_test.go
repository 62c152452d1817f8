package decision

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestDecodeStrict(t *testing.T) {
	tests := []struct {
		name, body string
		err        string // "" for accepted
	}{
		{"object", `{"a": 1, "b": {"c": [1, 2, {"d": null}]}}`, ""},
		{"same key in different objects", `{"a": {"k": 1}, "b": {"k": 2}}`, ""},
		{"duplicate nested key", `{"a": {"k": 1, "k": 2}}`, `duplicate key "k"`},
		{"duplicate key after nested value", `{"a": {"x": 1}, "a": 2}`, `duplicate key "a"`},
		{"string value equal to a key", `{"a": "a", "b": "a"}`, ""},
		{"trailing value", `{} 1`, "after the top-level value"},
		{"truncated", `{"a": [1, 2`, "unexpected end"},
		{"syntax", `{"a" 1}`, "invalid JSON"},
		{"deep arrays", strings.Repeat("[", 65) + strings.Repeat("]", 65), "nested deeper than 64"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var v any
			err := decodeStrict([]byte(tt.body), &v)
			switch {
			case tt.err == "" && err != nil:
				t.Fatalf("decodeStrict(%s) = %v, want nil", tt.body, err)
			case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
				t.Fatalf("decodeStrict(%s) = %v, want error containing %q", tt.body, err, tt.err)
			}
		})
	}
}

// FuzzDecodeStrict: whatever decodeStrict accepts is valid JSON without
// duplicate keys, and it never panics.
func FuzzDecodeStrict(f *testing.F) {
	for _, s := range []string{`{}`, `{"a": [1, {"b": "c"}]}`, `{"a": 1, "a": 2}`, `[[[]]]`, `"x"`, `{"a": {"a": {"a": 1}}}`, `1 2`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var v any
		if err := decodeStrict(body, &v); err != nil {
			return
		}
		if !json.Valid(body) {
			t.Fatalf("accepted invalid JSON %q", body)
		}
		// Re-encoding and decoding keeps every key: no duplicates were
		// silently merged.
		if countKeys(body) != countValueKeys(v) {
			t.Fatalf("accepted %q with duplicate keys", body)
		}
	})
}

func countKeys(body []byte) int {
	dec := json.NewDecoder(strings.NewReader(string(body)))
	n := 0
	var stack []bool // object?
	expectKey := []bool{}
	for {
		tok, err := dec.Token()
		if err != nil {
			return n
		}
		if len(stack) > 0 && stack[len(stack)-1] && expectKey[len(expectKey)-1] {
			if _, ok := tok.(string); ok {
				n++
				expectKey[len(expectKey)-1] = false
				continue
			}
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			stack = append(stack, tok == json.Delim('{'))
			expectKey = append(expectKey, true)
			continue
		case json.Delim('}'), json.Delim(']'):
			stack, expectKey = stack[:len(stack)-1], expectKey[:len(expectKey)-1]
		}
		if len(stack) > 0 && stack[len(stack)-1] {
			expectKey[len(expectKey)-1] = true
		}
	}
}

func countValueKeys(v any) int {
	switch x := v.(type) {
	case map[string]any:
		n := len(x)
		for _, e := range x {
			n += countValueKeys(e)
		}
		return n
	case []any:
		n := 0
		for _, e := range x {
			n += countValueKeys(e)
		}
		return n
	}
	return 0
}
