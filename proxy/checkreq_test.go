package proxy

import (
	"net/http"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/proto"
)

// TestCheckRequest: the request the enforcer sees is Envoy's description
// of it, field by field, and each request gets its own.
func TestCheckRequest(t *testing.T) {
	l := &inboundListener{ext: map[string]string{"writ.service": "orders"}}
	pi := &peerInfo{
		source: &authv3.AttributeContext_Peer{Principal: "spiffe://example.org/ns/a/sa/b"},
		dest:   &authv3.AttributeContext_Peer{Principal: "spiffe://example.org/ns/c/sa/d"},
	}
	r, _ := http.NewRequest("POST", "http://orders:8080/x/y?q=1", nil)
	r.Header.Add("X-A", "1")
	r.Header.Add("X-A", "2")
	want := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: pi.source, Destination: pi.dest,
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "POST", Path: "/x/y?q=1", Host: "orders:8080", Scheme: "https", Protocol: "HTTP/1.1",
			Headers: map[string]string{"x-a": "1,2", ":method": "POST", ":path": "/x/y?q=1", ":authority": "orders:8080", ":scheme": "https"},
		}},
		ContextExtensions: l.ext,
	}}
	got := l.checkRequest(r, pi)
	if !proto.Equal(got, want) {
		t.Fatalf("got %v\nwant %v", got, want)
	}
	r.Method = "GET"
	if other := l.checkRequest(r, pi); other == got || got.GetAttributes().GetRequest().GetHttp().GetMethod() != "POST" {
		t.Fatal("a second request's check changed the first's")
	}
}
