package enforcer

import (
	"context"
	"fmt"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Hand-built CheckRequests in the shapes Envoy sends: fields and header
// names as Envoy fills them for each protocol.

const (
	orderBody = `{"item": "book", "quantity": 2, "gift": true}`
	clientID  = "spiffe://cluster.local/ns/shop/sa/frontend"
	serverID  = "spiffe://cluster.local/ns/shop/sa/orders"
)

func peer(addr string, port uint32, principal string) *authv3.AttributeContext_Peer {
	return &authv3.AttributeContext_Peer{
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address:       addr,
			PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
		}}},
		Principal: principal,
	}
}

func checkRequest(src, dst *authv3.AttributeContext_Peer, h *authv3.AttributeContext_HttpRequest, ext map[string]string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      src,
		Destination: dst,
		Request: &authv3.AttributeContext_Request{
			Time: &timestamppb.Timestamp{Seconds: 1795000000, Nanos: 123000000},
			Http: h,
		},
		ContextExtensions: ext,
	}}
}

// goldenRequests are the recorded requests of the golden tests.
func goldenRequests() map[string]*authv3.CheckRequest {
	return map[string]*authv3.CheckRequest{
		"http1_plaintext": checkRequest(
			peer("10.0.0.1", 51234, ""),
			peer("10.0.0.2", 8080, ""),
			&authv3.AttributeContext_HttpRequest{
				Id: "1001", Method: "GET", Path: "/api/v1/users/42?verbose=true&tag=a&tag=b", Host: "orders.shop:8080",
				Scheme: "http", Protocol: "HTTP/1.1",
				Headers: map[string]string{
					":authority": "orders.shop:8080", ":method": "GET", ":path": "/api/v1/users/42?verbose=true&tag=a&tag=b",
					":scheme": "http", "accept": "*/*", "user-agent": "curl/8.5.0", "x-request-id": "6f0c2d9e-1",
				},
			}, nil),
		"http1_mtls_json_body": checkRequest(
			peer("10.0.0.1", 51236, clientID),
			peer("10.0.0.2", 8080, serverID),
			&authv3.AttributeContext_HttpRequest{
				Id: "1002", Method: "POST", Path: "/api/v1/users/42/orders", Host: "orders.shop",
				Scheme: "https", Protocol: "HTTP/1.1", Size: int64(len(orderBody)),
				Headers: map[string]string{
					":authority": "orders.shop", ":method": "POST", ":path": "/api/v1/users/42/orders", ":scheme": "https",
					"content-type": "application/json", "content-length": fmt.Sprint(len(orderBody)), "x-request-id": "6f0c2d9e-2",
				},
				Body: orderBody,
			}, nil),
		"http1_truncated_body": checkRequest(
			peer("10.0.0.1", 51238, clientID),
			peer("10.0.0.2", 8080, serverID),
			&authv3.AttributeContext_HttpRequest{
				Id: "1003", Method: "PUT", Path: "/api/v1/users/42", Host: "orders.shop",
				Scheme: "https", Protocol: "HTTP/1.1", Size: 100000,
				Headers: map[string]string{
					":authority": "orders.shop", ":method": "PUT", ":path": "/api/v1/users/42", ":scheme": "https",
					"content-type": "application/json", "content-length": "100000", "x-envoy-auth-partial-body": "true",
				},
				Body: `{"name": "a very long`,
			}, nil),
		"http2_mtls_normalized": checkRequest(
			peer("10.0.0.1", 51240, clientID),
			peer("10.0.0.2", 8443, serverID),
			&authv3.AttributeContext_HttpRequest{
				Id: "1004", Method: "GET", Path: "/public/%2e%2e//admin/./%7Eroot/report%3Fv1?id=7", Host: "orders.shop",
				Scheme: "https", Protocol: "HTTP/2",
				Headers: map[string]string{
					":authority": "orders.shop", ":method": "GET", ":path": "/public/%2e%2e//admin/./%7Eroot/report%3Fv1?id=7",
					":scheme": "https", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
				},
			}, nil),
		"grpc_mtls": checkRequest(
			peer("10.0.0.1", 51242, clientID),
			peer("10.0.0.2", 9090, serverID),
			&authv3.AttributeContext_HttpRequest{
				Id: "1005", Method: "POST", Path: "/shop.orders.v1.Orders/GetOrder", Host: "orders.shop:9090",
				Scheme: "http", Protocol: "HTTP/2", Size: 7,
				Headers: map[string]string{
					":authority": "orders.shop:9090", ":method": "POST", ":path": "/shop.orders.v1.Orders/GetOrder",
					":scheme": "http", "content-type": "application/grpc", "te": "trailers", "grpc-timeout": "1S",
					"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
				},
				RawBody: []byte{0, 0, 0, 0, 2, 8, 42},
			}, map[string]string{ServiceContextKey: "orders"}),
		// The same call, decoded with descriptors of its service
		// (TestInputGolden passes them for names ending in _descriptors).
		"grpc_mtls_descriptors": checkRequest(
			peer("10.0.0.1", 51242, clientID),
			peer("10.0.0.2", 9090, serverID),
			&authv3.AttributeContext_HttpRequest{
				Id: "1005", Method: "POST", Path: "/shop.orders.v1.Orders/GetOrder", Host: "orders.shop:9090",
				Scheme: "http", Protocol: "HTTP/2", Size: 7,
				Headers: map[string]string{
					":authority": "orders.shop:9090", ":method": "POST", ":path": "/shop.orders.v1.Orders/GetOrder",
					":scheme": "http", "content-type": "application/grpc", "te": "trailers",
				},
				RawBody: []byte{0, 0, 0, 0, 2, 8, 42},
			}, map[string]string{ServiceContextKey: "orders"}),
		"http1_form_body": checkRequest(
			peer("10.0.0.1", 51244, clientID),
			peer("10.0.0.2", 8080, serverID),
			&authv3.AttributeContext_HttpRequest{
				Id: "1006", Method: "POST", Path: "/login", Host: "orders.shop",
				Scheme: "https", Protocol: "HTTP/1.1", Size: 26,
				Headers: map[string]string{
					":authority": "orders.shop", ":method": "POST", ":path": "/login", ":scheme": "https",
					"content-type": "application/x-www-form-urlencoded", "content-length": "26",
				},
				Body: "user=ann&scope=a&scope=b+c",
			}, nil),
	}
}

// TestNetworkCheck: a CheckRequest without HTTP attributes (one per TCP
// connection, as Envoy's network filter sends) is decided on the peers
// alone, not refused as a bad path.
func TestNetworkCheck(t *testing.T) {
	e := newEnforcer(t, policyDir(t, `package envoy.authz
default allow := false
allow if input.writ.source.service_account == "client"
`), &recorder{}, nil)
	for _, tc := range []struct {
		name, source string
		want         string
	}{
		{"allowed peer", "spiffe://example.org/ns/demo/sa/client", ResultAllow},
		{"other peer", "spiffe://example.org/ns/demo/sa/other", ResultDeny},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
				Source: &authv3.AttributeContext_Peer{Principal: tc.source},
			}}
			_, d := e.Check(context.Background(), req)
			if d.Result != tc.want || (tc.want == ResultDeny && d.Cause != CausePolicy) {
				t.Errorf("got %s (%s: %s), want %s", d.Result, d.Cause, d.Reason, tc.want)
			}
		})
	}
}
