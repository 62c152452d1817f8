package enforcer

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/url"
	"os"
	"strconv"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// PartialBodyHeader is the CheckRequest header in which Envoy's ext_authz
// filter says, when it sends a body, whether it is only the first
// max_request_bytes of it ("true") or all of it ("false").
const PartialBodyHeader = "x-envoy-auth-partial-body"

// maxFormParts bounds the parts of a multipart body parsed into input, so
// that a body of many tiny parts cannot make many objects.
const maxFormParts = 1000

// bodyParser turns a request body into input.parsed_body as
// opa-envoy-plugin does: JSON, URL-encoded forms and multipart forms by
// content type, and gRPC messages when descriptors for the method are
// configured. Bodies larger than max, or shorter than their
// content-length says, are left unparsed and reported as truncated.
type bodyParser struct {
	max    int
	protos *protoregistry.Files // nil: gRPC bodies are not decoded
}

// parse returns the parsed body (null when there is none or its type is
// not parsed), whether it was truncated, and an error for a body that
// claims a type it does not have.
func (bp bodyParser) parse(h *authv3.AttributeContext_HttpRequest, target string) (ast.Value, bool, error) {
	ct := headerValue(h, "content-type")
	kind := bodyKind(ct)
	if kind == "" {
		return ast.NullValue, false, nil
	}
	// Envoy sends the body as a string, or as bytes with pack_as_bytes.
	body := []byte(h.GetBody())
	if len(body) == 0 {
		body = h.GetRawBody()
	}
	if len(body) == 0 {
		return ast.NullValue, false, nil
	}
	if kind != "grpc" {
		// Envoy (and writ-proxy) mark a body cut at max_request_bytes
		// with allow_partial_message; a chunked one has no
		// content-length to tell. A gRPC body's message length tells.
		if headerValue(h, PartialBodyHeader) == "true" {
			return ast.NullValue, true, nil
		}
		if cl := headerValue(h, "content-length"); cl != "" {
			n, err := strconv.ParseInt(cl, 10, 64)
			if err != nil {
				return nil, false, fmt.Errorf("content-length %q: %w", cl, err)
			}
			if n != -1 && n > int64(len(body)) {
				return ast.NullValue, true, nil
			}
		}
	}
	if len(body) > bp.max {
		return ast.NullValue, true, nil
	}
	switch kind {
	case "json":
		return parseJSONBody(body)
	case "form":
		vals, err := url.ParseQuery(string(body))
		if err != nil {
			return nil, false, fmt.Errorf("parse form body: %w", err)
		}
		return formValue(vals), false, nil
	case "multipart":
		return parseMultipart(ct, body)
	default:
		return bp.parseGRPC(body, target)
	}
}

func bodyKind(ct string) string {
	switch {
	case strings.Contains(ct, "application/json"):
		return "json"
	case strings.Contains(ct, "application/x-www-form-urlencoded"):
		return "form"
	case strings.Contains(ct, "multipart/form-data"):
		return "multipart"
	case strings.Contains(ct, "application/grpc"):
		return "grpc"
	}
	return ""
}

func parseJSONBody(body []byte) (ast.Value, bool, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, false, fmt.Errorf("parse JSON body: %w", err)
	}
	if dec.More() {
		return nil, false, errors.New("parse JSON body: trailing data")
	}
	av, err := ast.InterfaceToValue(v)
	if err != nil {
		return nil, false, fmt.Errorf("parse JSON body: %w", err)
	}
	return av, false, nil
}

// formValue is a form as an object of value lists, as url.Values is.
func formValue(vals url.Values) ast.Object {
	o := ast.NewObject()
	for k, vs := range vals {
		l := make([]*ast.Term, len(vs))
		for i, v := range vs {
			l[i] = ast.StringTerm(v)
		}
		o.Insert(ast.StringTerm(k), ast.ArrayTerm(l...))
	}
	return o
}

// parseMultipart reads the form fields of a multipart body into an object
// of value lists; a part whose own content type is JSON contributes its
// parsed value, any other part its text.
func parseMultipart(ct string, body []byte) (ast.Value, bool, error) {
	_, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return nil, false, fmt.Errorf("parse multipart body: content-type: %w", err)
	}
	boundary := params["boundary"]
	if boundary == "" {
		return nil, false, errors.New("parse multipart body: no boundary")
	}
	mr := multipart.NewReader(bytes.NewReader(body), boundary)
	fields := map[string][]*ast.Term{}
	var order []string
	for n := 0; ; n++ {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, false, fmt.Errorf("parse multipart body: %w", err)
		}
		if n >= maxFormParts {
			return nil, false, fmt.Errorf("parse multipart body: more than %d parts", maxFormParts)
		}
		name := p.FormName()
		if name == "" {
			continue
		}
		raw, err := io.ReadAll(p) // bounded by the body, itself bounded
		if err != nil {
			return nil, false, fmt.Errorf("parse multipart body: %w", err)
		}
		var t *ast.Term
		if strings.Contains(p.Header.Get("Content-Type"), "application/json") {
			v, _, err := parseJSONBody(raw)
			if err != nil {
				return nil, false, fmt.Errorf("multipart part %q: %w", name, err)
			}
			t = ast.NewTerm(v)
		} else {
			t = ast.StringTerm(string(raw))
		}
		if _, ok := fields[name]; !ok {
			order = append(order, name)
		}
		fields[name] = append(fields[name], t)
	}
	o := ast.NewObject()
	for _, k := range order {
		o.Insert(ast.StringTerm(k), ast.ArrayTerm(fields[k]...))
	}
	return o, false, nil
}

// parseGRPC decodes the first message of a gRPC request body with the
// request type of the method the path names, then renders it as
// protojson does. Without descriptors, for an unknown method, or for a
// compressed message the body stays null (as in opa-envoy-plugin); a
// message longer than the body is truncated.
func (bp bodyParser) parseGRPC(body []byte, target string) (ast.Value, bool, error) {
	if bp.protos == nil {
		return ast.NullValue, false, nil
	}
	if len(body) < 5 {
		return nil, false, fmt.Errorf("gRPC body: %d bytes, shorter than a message header", len(body))
	}
	if body[0] != 0 {
		return ast.NullValue, false, nil // compressed: not decoded
	}
	size := binary.BigEndian.Uint32(body[1:5])
	if uint64(size) > uint64(len(body)-5) {
		return ast.NullValue, true, nil
	}
	msg := body[5 : 5+int(size)]
	path, _, _ := strings.Cut(target, "?")
	svc, method, ok := strings.Cut(strings.TrimPrefix(path, "/"), "/")
	if !ok || svc == "" || method == "" || strings.Contains(method, "/") {
		return nil, false, fmt.Errorf("gRPC body: path %q is not /package.Service/Method", path)
	}
	d, err := bp.protos.FindDescriptorByName(protoreflect.FullName(svc + "." + method))
	if err != nil {
		return ast.NullValue, false, nil
	}
	md, ok := d.(protoreflect.MethodDescriptor)
	if !ok {
		return ast.NullValue, false, nil
	}
	m := dynamicpb.NewMessage(md.Input())
	if err := (proto.UnmarshalOptions{}).Unmarshal(msg, m); err != nil {
		return nil, false, fmt.Errorf("gRPC body: decode %s: %w", md.Input().FullName(), err)
	}
	js, err := protojson.Marshal(m)
	if err != nil {
		return nil, false, fmt.Errorf("gRPC body: %w", err)
	}
	v, _, err := parseJSONBody(js)
	return v, false, err
}

// LoadProtoDescriptors reads a FileDescriptorSet (protoc
// --descriptor_set_out --include_imports, buf build -o x.pb) whose
// services' request messages writ-enforcer decodes into
// input.parsed_body, as opa-envoy-plugin's proto_descriptor does.
func LoadProtoDescriptors(file string) (*protoregistry.Files, error) {
	bs, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("proto descriptors: %w", err)
	}
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(bs, &set); err != nil {
		return nil, fmt.Errorf("proto descriptors %s: %w", file, err)
	}
	files, err := protodesc.NewFiles(&set)
	if err != nil {
		return nil, fmt.Errorf("proto descriptors %s: %w", file, err)
	}
	return files, nil
}
