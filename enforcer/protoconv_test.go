package enforcer

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// variedRequests adds to the golden requests the fields Envoy fills less
// often: metadata with Struct values of every kind, TLS session, labels,
// header_map, timestamps at every precision, and random strings.
func variedRequests(n int) []*authv3.CheckRequest {
	r := rand.New(rand.NewPCG(3, 4))
	var reqs []*authv3.CheckRequest
	for _, req := range goldenRequests() {
		reqs = append(reqs, req)
	}
	nums := []float64{0, 1, -1, 2.5, 1e-7, 1e21, 123456789012, 1.0 / 3, -0.000001, 5e-324, math.MaxFloat64}
	for i := range n {
		meta, _ := structpb.NewStruct(map[string]any{
			"n":      nums[r.IntN(len(nums))],
			"s":      fmt.Sprintf("v%d\u00e9\n\"", r.IntN(100)),
			"b":      r.IntN(2) == 0,
			"null":   nil,
			"list":   []any{1.5, "x", map[string]any{"deep": nums[r.IntN(len(nums))]}},
			"nested": map[string]any{"k": []any{}},
		})
		nanos := []int32{0, 100000000, 120000000, 123000000, 123400000, 123456000, 123456789, 1}[r.IntN(8)]
		req := checkRequest(peer("10.0.0.1", uint32(r.IntN(65536)), clientID), peer("::1", 443, serverID),
			&authv3.AttributeContext_HttpRequest{
				Id: fmt.Sprint(r.Uint64()), Method: "GET", Path: "/a/b?c=d", Host: "h", Size: r.Int64(),
				Fragment: "f", Query: "c=d", Scheme: "https", Protocol: "HTTP/1.0",
				Headers:   map[string]string{"x-random": fmt.Sprintf("%x", r.Uint64()), ":path": "/a/./b?c=d"},
				HeaderMap: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: "a", Value: "b"}, {Key: "raw", RawValue: []byte{0, 1, 2}}}},
			}, map[string]string{"k": fmt.Sprint(i)})
		req.Attributes.Request.Time = &timestamppb.Timestamp{Seconds: r.Int64N(4e9), Nanos: nanos}
		req.Attributes.Source.Labels = map[string]string{"app": "web", "v": fmt.Sprint(i)}
		req.Attributes.Source.Service = "web"
		req.Attributes.Source.Certificate = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n"
		req.Attributes.MetadataContext = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.filters.http.jwt_authn": meta}}
		req.Attributes.TlsSession = &authv3.AttributeContext_TLSSession{Sni: "orders.shop"}
		reqs = append(reqs, req)
	}
	return reqs
}

func TestDirectConversionMatchesProtojson(t *testing.T) {
	for i, req := range variedRequests(300) {
		fast, err := protoToValue(req, "/normalized?c=d", nil)
		if err != nil {
			t.Fatalf("request %d: direct conversion: %v", i, err)
		}
		slow, err := protojsonValue(req, "/normalized?c=d")
		if err != nil {
			t.Fatalf("request %d: protojson: %v", i, err)
		}
		if fast.Compare(slow) != 0 || fast.String() != slow.String() {
			t.Fatalf("request %d differs:\ndirect    %v\nprotojson %v", i, fast, slow)
		}
	}
}

func TestDirectConversionFallsBack(t *testing.T) {
	any, err := anypb.New(&authv3.AttributeContext_TLSSession{Sni: "x"})
	if err != nil {
		t.Fatal(err)
	}
	req := goldenRequests()["grpc_mtls"]
	req.Attributes.MetadataContext = &corev3.Metadata{TypedFilterMetadata: map[string]*anypb.Any{"t": any}}
	if _, err := protoToValue(req, "/x", nil); err != errSlowPath {
		t.Fatalf("Any converted directly (err %v); protojson must handle it", err)
	}
	in, _, err := buildInput(req, DefaultMaxBodyBytes, nil)
	if err != nil {
		t.Fatal(err)
	}
	v, err := in.Find(ast.MustParseRef(`x.attributes.metadataContext.typedFilterMetadata.t["@type"]`)[1:])
	if err != nil || v.Compare(ast.String("type.googleapis.com/envoy.service.auth.v3.AttributeContext.TLSSession")) != 0 {
		t.Fatalf("slow path lost the Any: %v %v", v, err)
	}
}
