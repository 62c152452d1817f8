package enforcer

import (
	"encoding/base64"
	"errors"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// errSlowPath means the direct conversion met something it leaves to
// protojson (google.protobuf.Any, Duration, non-string map keys, values
// protojson would refuse), so that both ways always agree.
var errSlowPath = errors.New("input needs protojson")

var httpRequestName = (&authv3.AttributeContext_HttpRequest{}).ProtoReflect().Descriptor().FullName()

// protoToValue builds the AST value protojson.Marshal followed by a JSON
// parse would give, without the JSON round trip: lowerCamelCase field names,
// unpopulated fields left out, 64-bit integers as strings, enums by name,
// bytes as base64, Timestamp as RFC 3339, Struct as JSON. The request path
// and the ":path" header are replaced by target.
func protoToValue(req *authv3.CheckRequest, target string, n *need) (ast.Object, error) {
	c := converter{target: target}
	v, err := c.message(req.ProtoReflect(), n)
	if err != nil {
		return nil, err
	}
	return v.(ast.Object), nil
}

type converter struct{ target string }

// need is the part of the input a policy can read: everything below a node
// with all set, else only the named children. A nil *need stands for
// everything.
type need struct {
	all  bool
	kids map[string]*need
	// order lists kids in key order with their key terms, built once so
	// that a request neither iterates a map nor allocates key terms.
	order []needKid
}

type needKid struct {
	name string
	key  *ast.Term
	need *need
}

var needAll = &need{all: true}

// newNeed builds the tree for the paths of policy.Snapshot.InputPaths.
func newNeed(paths [][]string, whole bool) *need {
	if whole {
		return needAll
	}
	root := &need{kids: map[string]*need{}}
	for _, p := range paths {
		n := root
		for i, k := range p {
			if n.all {
				break
			}
			kid := n.kids[k]
			if kid == nil {
				kid = &need{kids: map[string]*need{}}
				n.kids[k] = kid
			}
			if i == len(p)-1 {
				kid.all, kid.kids = true, nil
			}
			n = kid
		}
	}
	root.index()
	return root
}

// index fills order in every node below n.
func (n *need) index() {
	if n == nil || n.all {
		return
	}
	n.order = n.order[:0]
	for k, kid := range n.kids {
		n.order = append(n.order, needKid{name: k, key: ast.StringTerm(k), need: kid})
		kid.index()
	}
	slices.SortFunc(n.order, func(a, b needKid) int { return strings.Compare(a.name, b.name) })
}

// child is what is needed under key k, or nil if nothing.
func (n *need) child(k string) *need {
	if n == nil || n.all {
		return needAll
	}
	return n.kids[k]
}

func (c *converter) message(m protoreflect.Message, n *need) (ast.Value, error) {
	d := m.Descriptor()
	if d.FullName().Parent() == "google.protobuf" {
		return c.wellKnown(m)
	}
	if n == nil {
		n = needAll
	}
	isHTTP := d.FullName() == httpRequestName
	if !n.all {
		// Visit only the fields the policy can read: protojson names
		// fields by JSON name and leaves unpopulated ones out, as Has
		// does. No closure here: this is the hot path, and a closure's
		// captured variables would be allocated on every call.
		items := make([][2]*ast.Term, 0, len(n.order))
		fields := d.Fields()
		for _, kid := range n.order {
			fd := fields.ByJSONName(kid.name)
			if fd == nil || !m.Has(fd) {
				continue
			}
			val, err := c.field(fd, m.Get(fd), kid.need, isHTTP)
			if err != nil {
				return nil, err
			}
			items = append(items, ast.Item(keyTerm(fd), ast.NewTerm(val)))
		}
		return ast.NewObject(items...), nil
	}
	items := make([][2]*ast.Term, 0, d.Fields().Len())
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		var val ast.Value
		if val, err = c.field(fd, v, needAll, isHTTP); err != nil {
			return false
		}
		items = append(items, ast.Item(keyTerm(fd), ast.NewTerm(val)))
		return true
	})
	if err != nil {
		return nil, err
	}
	return ast.NewObject(items...), nil
}

// field converts one populated field of a message.
func (c *converter) field(fd protoreflect.FieldDescriptor, v protoreflect.Value, sub *need, isHTTP bool) (ast.Value, error) {
	switch {
	case fd.IsMap():
		return c.mapValue(fd, v.Map(), isHTTP && fd.Name() == "headers", sub)
	case fd.IsList():
		return c.list(fd, v.List())
	case isHTTP && fd.Name() == "path":
		return ast.String(c.target), nil
	case fd.Kind() == protoreflect.MessageKind:
		return c.message(v.Message(), sub)
	default:
		return c.singular(fd, v)
	}
}

// keyTerms holds one shared key term per field, so that building an input
// does not allocate a term for every field name. Terms are never modified
// once in an object, as OPA's own interned terms are not.
var keyTerms sync.Map // protoreflect.FullName -> *ast.Term

func keyTerm(fd protoreflect.FieldDescriptor) *ast.Term {
	if t, ok := keyTerms.Load(fd.FullName()); ok {
		return t.(*ast.Term)
	}
	t, _ := keyTerms.LoadOrStore(fd.FullName(), ast.StringTerm(fd.JSONName()))
	return t.(*ast.Term)
}

func (c *converter) mapValue(fd protoreflect.FieldDescriptor, m protoreflect.Map, headers bool, n *need) (ast.Value, error) {
	if fd.MapKey().Kind() != protoreflect.StringKind {
		return nil, errSlowPath
	}
	items := make([][2]*ast.Term, 0, m.Len())
	var err error
	m.Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
		ks := k.String()
		if !utf8.ValidString(ks) {
			err = errSlowPath
			return false
		}
		sub := n.child(ks)
		if sub == nil {
			return true
		}
		var val ast.Value
		if headers && ks == ":path" {
			val = ast.String(c.target)
		} else if fd.MapValue().Kind() == protoreflect.MessageKind {
			if val, err = c.message(v.Message(), sub); err != nil {
				return false
			}
		} else if val, err = c.singular(fd.MapValue(), v); err != nil {
			return false
		}
		items = append(items, ast.Item(ast.StringTerm(ks), ast.NewTerm(val)))
		return true
	})
	if err != nil {
		return nil, err
	}
	return ast.NewObject(items...), nil
}

func (c *converter) list(fd protoreflect.FieldDescriptor, l protoreflect.List) (ast.Value, error) {
	terms := make([]*ast.Term, l.Len())
	for i := range terms {
		v, err := c.singular(fd, l.Get(i))
		if err != nil {
			return nil, err
		}
		terms[i] = ast.NewTerm(v)
	}
	return ast.NewArray(terms...), nil
}

func (c *converter) singular(fd protoreflect.FieldDescriptor, v protoreflect.Value) (ast.Value, error) {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return ast.Boolean(v.Bool()), nil
	case protoreflect.StringKind:
		s := v.String()
		if !utf8.ValidString(s) {
			return nil, errSlowPath
		}
		return ast.String(s), nil
	case protoreflect.BytesKind:
		return ast.String(base64.StdEncoding.EncodeToString(v.Bytes())), nil
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return ast.Number(strconv.FormatInt(v.Int(), 10)), nil
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return ast.Number(strconv.FormatUint(v.Uint(), 10)), nil
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return ast.String(strconv.FormatInt(v.Int(), 10)), nil
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return ast.String(strconv.FormatUint(v.Uint(), 10)), nil
	case protoreflect.FloatKind:
		return floatValue(v.Float(), 32), nil
	case protoreflect.DoubleKind:
		return floatValue(v.Float(), 64), nil
	case protoreflect.EnumKind:
		if fd.Enum().FullName() == "google.protobuf.NullValue" {
			return ast.Null{}, nil
		}
		if ev := fd.Enum().Values().ByNumber(v.Enum()); ev != nil {
			return ast.String(string(ev.Name())), nil
		}
		return ast.Number(strconv.FormatInt(int64(v.Enum()), 10)), nil
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return c.message(v.Message(), needAll)
	}
	return nil, errSlowPath
}

// floatValue formats like protojson: shortest representation, exponent
// form outside [1e-6, 1e21), non-finite values as strings.
func floatValue(f float64, bits int) ast.Value {
	switch {
	case math.IsNaN(f):
		return ast.String("NaN")
	case math.IsInf(f, 1):
		return ast.String("Infinity")
	case math.IsInf(f, -1):
		return ast.String("-Infinity")
	}
	format := byte('f')
	if a := math.Abs(f); a != 0 {
		if bits == 64 && (a < 1e-6 || a >= 1e21) || bits == 32 && (float32(a) < 1e-6 || float32(a) >= 1e21) {
			format = 'e'
		}
	}
	s := strconv.FormatFloat(f, format, -1, bits)
	if format == 'e' {
		// 1e-07 becomes 1e-7, as JSON encoders write it.
		if n := len(s); n >= 4 && s[n-4] == 'e' && s[n-3] == '-' && s[n-2] == '0' {
			s = s[:n-2] + s[n-1:]
		}
	}
	return ast.Number(s)
}

// Bounds protojson accepts for a Timestamp.
const (
	minTimestamp = -62135596800 // 0001-01-01T00:00:00Z
	maxTimestamp = 253402300799 // 9999-12-31T23:59:59Z
)

// wellKnown converts the google.protobuf types protojson treats specially,
// always whole.
func (c *converter) wellKnown(m protoreflect.Message) (ast.Value, error) {
	d := m.Descriptor()
	fields := d.Fields()
	switch d.Name() {
	case "Timestamp":
		secs := m.Get(fields.ByName("seconds")).Int()
		nanos := m.Get(fields.ByName("nanos")).Int()
		if secs < minTimestamp || secs > maxTimestamp || nanos < 0 || nanos > 999999999 {
			return nil, errSlowPath
		}
		s := time.Unix(secs, nanos).UTC().Format("2006-01-02T15:04:05.000000000")
		s = strings.TrimSuffix(s, "000")
		s = strings.TrimSuffix(s, "000")
		s = strings.TrimSuffix(s, ".000")
		return ast.String(s + "Z"), nil
	case "Struct":
		return c.mapValue(fields.ByName("fields"), m.Get(fields.ByName("fields")).Map(), false, needAll)
	case "ListValue":
		return c.list(fields.ByName("values"), m.Get(fields.ByName("values")).List())
	case "Value":
		od := m.WhichOneof(d.Oneofs().ByName("kind"))
		if od == nil {
			return nil, errSlowPath // protojson refuses an unset Value
		}
		if od.Kind() == protoreflect.DoubleKind {
			if f := m.Get(od).Float(); math.IsNaN(f) || math.IsInf(f, 0) {
				return nil, errSlowPath
			}
		}
		return c.singular(od, m.Get(od))
	case "BoolValue", "StringValue", "BytesValue", "Int32Value", "UInt32Value",
		"Int64Value", "UInt64Value", "FloatValue", "DoubleValue":
		fd := fields.ByName("value")
		return c.singular(fd, m.Get(fd))
	}
	return nil, errSlowPath
}
