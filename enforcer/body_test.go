package enforcer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// ordersDescriptorSet describes shop.orders.v1.Orders, the service of the
// gRPC golden requests, as protoc --descriptor_set_out would.
func ordersDescriptorSet() *descriptorpb.FileDescriptorSet {
	field := func(name string, n int32, typ descriptorpb.FieldDescriptorProto_Type, label descriptorpb.FieldDescriptorProto_Label) *descriptorpb.FieldDescriptorProto {
		return &descriptorpb.FieldDescriptorProto{Name: proto.String(name), Number: proto.Int32(n), Type: typ.Enum(), Label: label.Enum(), JsonName: proto.String(name)}
	}
	opt := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL
	return &descriptorpb.FileDescriptorSet{File: []*descriptorpb.FileDescriptorProto{{
		Name:    proto.String("shop/orders/v1/orders.proto"),
		Package: proto.String("shop.orders.v1"),
		Syntax:  proto.String("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{
			{Name: proto.String("GetOrderRequest"), Field: []*descriptorpb.FieldDescriptorProto{
				field("id", 1, descriptorpb.FieldDescriptorProto_TYPE_INT64, opt),
				field("note", 2, descriptorpb.FieldDescriptorProto_TYPE_STRING, opt),
				field("tags", 3, descriptorpb.FieldDescriptorProto_TYPE_STRING, descriptorpb.FieldDescriptorProto_LABEL_REPEATED),
			}},
			{Name: proto.String("Order"), Field: []*descriptorpb.FieldDescriptorProto{
				field("id", 1, descriptorpb.FieldDescriptorProto_TYPE_INT64, opt),
			}},
		},
		Service: []*descriptorpb.ServiceDescriptorProto{{
			Name: proto.String("Orders"),
			Method: []*descriptorpb.MethodDescriptorProto{{
				Name: proto.String("GetOrder"), InputType: proto.String(".shop.orders.v1.GetOrderRequest"), OutputType: proto.String(".shop.orders.v1.Order"),
			}},
		}},
	}}}
}

// testProtos loads ordersDescriptorSet the way writ-enforcer loads its
// --proto-descriptors file.
func testProtos(t testing.TB) *protoregistry.Files {
	t.Helper()
	bs, err := proto.Marshal(ordersDescriptorSet())
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "orders.pb")
	if err := os.WriteFile(file, bs, 0o644); err != nil {
		t.Fatal(err)
	}
	files, err := LoadProtoDescriptors(file)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// grpcFrame frames msg as one uncompressed gRPC message.
func grpcFrame(msg []byte) []byte {
	n := len(msg)
	return append([]byte{0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}, msg...)
}

func bodyRequest(ct, body string, raw []byte, path string, extra map[string]string) *authv3.CheckRequest {
	h := map[string]string{":method": "POST", ":path": path, "content-type": ct}
	for k, v := range extra {
		h[k] = v
	}
	return checkRequest(peer("10.0.0.1", 51250, clientID), peer("10.0.0.2", 8080, serverID),
		&authv3.AttributeContext_HttpRequest{Method: "POST", Path: path, Host: "orders.shop", Protocol: "HTTP/2", Headers: h, Body: body, RawBody: raw}, nil)
}

// TestParsedBody: each content type opa-envoy-plugin parses, its limits
// and its refusals.
func TestParsedBody(t *testing.T) {
	protos := testProtos(t)
	getOrder, err := proto.Marshal(mustDynamic(t, protos, `{"id": "7", "note": "gift", "tags": ["a", "b"]}`))
	if err != nil {
		t.Fatal(err)
	}
	multipartBody := "--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n" +
		"--XyZ\r\nContent-Disposition: form-data; name=\"meta\"\r\nContent-Type: application/json\r\n\r\n{\"n\": 1}\r\n" +
		"--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nagain\r\n--XyZ--\r\n"
	tests := []struct {
		name      string
		req       *authv3.CheckRequest
		protos    *protoregistry.Files
		max       int
		want      string // parsed_body as JSON
		truncated bool
		err       string
	}{
		{"json", bodyRequest("application/json", `{"a": [1, 2]}`, nil, "/x", nil), nil, 0, `{"a":[1,2]}`, false, ""},
		{"json as raw bytes", bodyRequest("application/json; charset=utf-8", "", []byte(`{"a": true}`), "/x", nil), nil, 0, `{"a":true}`, false, ""},
		{"json over the limit", bodyRequest("application/json", `{"a": "0123456789"}`, nil, "/x", nil), nil, 10, `null`, true, ""},
		{"json shorter than content-length", bodyRequest("application/json", `{"a":`, nil, "/x", map[string]string{"content-length": "900"}), nil, 0, `null`, true, ""},
		{"json cut by the proxy, length unknown", bodyRequest("application/json", `{"a":`, nil, "/x", map[string]string{PartialBodyHeader: "true"}), nil, 0, `null`, true, ""},
		{"json whole per the proxy", bodyRequest("application/json", `{"a": 1}`, nil, "/x", map[string]string{PartialBodyHeader: "false"}), nil, 0, `{"a":1}`, false, ""},
		{"form cut by the proxy", bodyRequest("application/x-www-form-urlencoded", "a=1&b", nil, "/x", map[string]string{PartialBodyHeader: "true"}), nil, 0, `null`, true, ""},
		{"no body, claimed partial", bodyRequest("application/json", "", nil, "/x", map[string]string{PartialBodyHeader: "true"}), nil, 0, `null`, false, ""},
		{"bad json", bodyRequest("application/json", `{"a":`, nil, "/x", nil), nil, 0, "", false, "parse JSON body"},
		{"form", bodyRequest("application/x-www-form-urlencoded", "a=1&b=x%20y&a=2", nil, "/x", nil), nil, 0, `{"a":["1","2"],"b":["x y"]}`, false, ""},
		{"bad form", bodyRequest("application/x-www-form-urlencoded", "a=%zz", nil, "/x", nil), nil, 0, "", false, "parse form body"},
		{"multipart", bodyRequest("multipart/form-data; boundary=XyZ", multipartBody, nil, "/x", nil), nil, 0, `{"meta":[{"n":1}],"title":["hello","again"]}`, false, ""},
		{"multipart without boundary", bodyRequest("multipart/form-data", multipartBody, nil, "/x", nil), nil, 0, "", false, "no boundary"},
		{"text is not parsed", bodyRequest("text/plain", "hello", nil, "/x", nil), nil, 0, `null`, false, ""},
		{"grpc without descriptors", bodyRequest("application/grpc", "", grpcFrame(getOrder), "/shop.orders.v1.Orders/GetOrder", nil), nil, 0, `null`, false, ""},
		{"grpc decoded", bodyRequest("application/grpc", "", grpcFrame(getOrder), "/shop.orders.v1.Orders/GetOrder", nil), protos, 0, `{"id":"7","note":"gift","tags":["a","b"]}`, false, ""},
		{"grpc+proto decoded", bodyRequest("application/grpc+proto", "", grpcFrame(getOrder), "/shop.orders.v1.Orders/GetOrder", nil), protos, 0, `{"id":"7","note":"gift","tags":["a","b"]}`, false, ""},
		{"grpc unknown method", bodyRequest("application/grpc", "", grpcFrame(getOrder), "/shop.orders.v1.Orders/Other", nil), protos, 0, `null`, false, ""},
		{"grpc compressed", bodyRequest("application/grpc", "", append([]byte{1}, grpcFrame(getOrder)[1:]...), "/shop.orders.v1.Orders/GetOrder", nil), protos, 0, `null`, false, ""},
		{"grpc cut after its first message", bodyRequest("application/grpc", "", append(grpcFrame(getOrder), 0, 0), "/shop.orders.v1.Orders/GetOrder", map[string]string{PartialBodyHeader: "true"}), protos, 0, `{"id":"7","note":"gift","tags":["a","b"]}`, false, ""},
		{"grpc partial message", bodyRequest("application/grpc", "", grpcFrame(getOrder)[:6], "/shop.orders.v1.Orders/GetOrder", nil), protos, 0, `null`, true, ""},
		{"grpc over the limit", bodyRequest("application/grpc", "", grpcFrame(getOrder), "/shop.orders.v1.Orders/GetOrder", nil), protos, 8, `null`, true, ""},
		{"grpc short header", bodyRequest("application/grpc", "", []byte{0, 0}, "/shop.orders.v1.Orders/GetOrder", nil), protos, 0, "", false, "shorter than a message header"},
		{"grpc garbage message", bodyRequest("application/grpc", "", grpcFrame([]byte{0xff, 0xff}), "/shop.orders.v1.Orders/GetOrder", nil), protos, 0, "", false, "decode shop.orders.v1.GetOrderRequest"},
		{"grpc bad path", bodyRequest("application/grpc", "", grpcFrame(getOrder), "/GetOrder", nil), protos, 0, "", false, "not /package.Service/Method"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			max := tc.max
			if max == 0 {
				max = DefaultMaxBodyBytes
			}
			in, _, err := buildInputWith(tc.req, bodyParser{max: max, protos: tc.protos}, nil)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			obj := in.(ast.Object)
			body, err := ast.JSON(obj.Get(ast.StringTerm("parsed_body")).Value)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := json.Marshal(body)
			if string(got) != tc.want {
				t.Errorf("parsed_body %s, want %s", got, tc.want)
			}
			if tr := obj.Get(ast.StringTerm("truncated_body")).Value; tr != ast.Boolean(tc.truncated) {
				t.Errorf("truncated_body %v, want %v", tr, tc.truncated)
			}
		})
	}
}

func mustDynamic(t testing.TB, files *protoregistry.Files, js string) proto.Message {
	t.Helper()
	d, err := files.FindDescriptorByName("shop.orders.v1.GetOrderRequest")
	if err != nil {
		t.Fatal(err)
	}
	m := dynamicpb.NewMessage(d.(protoreflect.MessageDescriptor))
	if err := protojson.Unmarshal([]byte(js), m); err != nil {
		t.Fatalf("%s: %v", js, err)
	}
	return m
}
