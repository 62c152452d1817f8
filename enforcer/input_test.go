package enforcer

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden.json")

func inputJSON(t *testing.T, v ast.Value) []byte {
	t.Helper()
	x, err := ast.JSON(v)
	if err != nil {
		t.Fatal(err)
	}
	bs, err := json.MarshalIndent(x, "", "  ") // map keys come out sorted
	if err != nil {
		t.Fatal(err)
	}
	return append(bs, '\n')
}

func TestInputGolden(t *testing.T) {
	protos := testProtos(t)
	for name, req := range goldenRequests() {
		t.Run(name, func(t *testing.T) {
			bp := bodyParser{max: DefaultMaxBodyBytes}
			if strings.HasSuffix(name, "_descriptors") {
				bp.protos = protos
			}
			in, _, err := buildInputWith(req, bp, nil)
			if err != nil {
				t.Fatal(err)
			}
			got := inputJSON(t, in)
			file := filepath.Join("testdata", name+".golden.json")
			if *update {
				if err := os.WriteFile(file, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(file)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("input differs from %s (go test -update rewrites it):\n%s", file, got)
			}
		})
	}
}

// TestInputShape pins the opa-envoy-plugin field names policies are
// written against, independent of the golden files.
func TestInputShape(t *testing.T) {
	reqs := goldenRequests()
	tests := []struct {
		req, ref string
		want     any
	}{
		{"http1_plaintext", "input.attributes.source.address.socketAddress.portValue", json.Number("51234")},
		{"http1_plaintext", "input.attributes.source.address.socketAddress.address", "10.0.0.1"},
		{"http1_plaintext", "input.attributes.request.http.method", "GET"},
		{"http1_plaintext", "input.attributes.request.http.headers[\"user-agent\"]", "curl/8.5.0"},
		{"http1_plaintext", "input.parsed_path", []any{"api", "v1", "users", "42"}},
		{"http1_plaintext", "input.parsed_query.tag", []any{"a", "b"}},
		{"http1_plaintext", "input.parsed_body", nil},
		{"http1_plaintext", "input.truncated_body", false},
		{"http1_plaintext", "input.version", map[string]any{"encoding": "protojson", "ext_authz": "v3"}},
		{"http1_plaintext", "input.writ.source", map[string]any{}},
		{"http1_plaintext", "input.writ.destination_service", "orders.shop"},
		{"http1_plaintext", "input.attributes.request.time", "2026-11-18T11:06:40.123Z"},
		{"http1_mtls_json_body", "input.parsed_body.quantity", json.Number("2")},
		{"http1_mtls_json_body", "input.attributes.request.http.size", "45"},
		{"http1_mtls_json_body", "input.attributes.source.principal", clientID},
		{"http1_mtls_json_body", "input.writ.source", map[string]any{"id": clientID, "trust_domain": "cluster.local", "namespace": "shop", "service_account": "frontend"}},
		{"http1_mtls_json_body", "input.writ.destination.service_account", "orders"},
		{"http1_truncated_body", "input.truncated_body", true},
		{"http1_truncated_body", "input.parsed_body", nil},
		{"http2_mtls_normalized", "input.attributes.request.http.path", "/admin/~root/report%3Fv1?id=7"},
		{"http2_mtls_normalized", "input.attributes.request.http.headers[\":path\"]", "/admin/~root/report%3Fv1?id=7"},
		{"http2_mtls_normalized", "input.parsed_path", []any{"admin", "~root", "report?v1"}},
		{"http2_mtls_normalized", "input.attributes.request.http.protocol", "HTTP/2"},
		{"grpc_mtls", "input.attributes.request.http.rawBody", "AAAAAAIIKg=="},
		{"grpc_mtls", "input.parsed_path", []any{"shop.orders.v1.Orders", "GetOrder"}},
		{"grpc_mtls", "input.writ.destination_service", "orders"},
		{"grpc_mtls", "input.parsed_body", nil},
		{"http1_form_body", "input.parsed_body", map[string]any{"scope": []any{"a", "b c"}, "user": []any{"ann"}}},
		{"grpc_mtls", "input.attributes.contextExtensions[\"writ.service\"]", "orders"},
	}
	for _, tt := range tests {
		t.Run(tt.req+" "+tt.ref, func(t *testing.T) {
			in, _, err := buildInput(reqs[tt.req], DefaultMaxBodyBytes, nil)
			if err != nil {
				t.Fatal(err)
			}
			ref := ast.MustParseRef(tt.ref)
			v, err := in.Find(ref[1:])
			if err != nil {
				t.Fatalf("%s not found: %v", tt.ref, err)
			}
			got, err := ast.JSON(v)
			if err != nil {
				t.Fatal(err)
			}
			if !jsonEqual(got, tt.want) {
				t.Fatalf("%s = %#v, want %#v", tt.ref, got, tt.want)
			}
		})
	}
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

func TestFacts(t *testing.T) {
	_, f, err := buildInput(goldenRequests()["http2_mtls_normalized"], DefaultMaxBodyBytes, nil)
	if err != nil {
		t.Fatal(err)
	}
	if f.traceID != "4bf92f3577b34da6a3ce929d0e0e4736" || f.path != "/admin/~root/report%3Fv1" ||
		f.rawPath != "/public/%2e%2e//admin/./%7Eroot/report%3Fv1?id=7" || f.source != clientID {
		t.Fatalf("facts %+v", f)
	}
	_, f, _ = buildInput(goldenRequests()["grpc_mtls"], DefaultMaxBodyBytes, nil)
	if !f.grpc {
		t.Fatal("gRPC request not recognised")
	}
	for tp, want := range map[string]string{
		"00-00000000000000000000000000000000-00f067aa0ba902b7-01": "",
		"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01": "",
		"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01": "",
		"garbage": "",
		" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ":   "4bf92f3577b34da6a3ce929d0e0e4736",
		"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz": "4bf92f3577b34da6a3ce929d0e0e4736",
		"00-4bf92f3577b34da6a3ce929d0e0e4736--":                       "4bf92f3577b34da6a3ce929d0e0e4736",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7":        "",
		"000-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01":    "",
		"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01":      "",
		"00-4bf92f3577b34da6a3ce929d0e0e4736":                         "",
	} {
		if got := traceID(tp); got != want {
			t.Errorf("traceID(%q) = %q", tp, got)
		}
	}
}

// TestSpiffePartsCached: the cached object equals a fresh parse, and the
// same object is returned for the same principal.
func TestSpiffePartsCached(t *testing.T) {
	for _, p := range []string{"spiffe://example.org/ns/shop/sa/orders", "spiffe://example.org/writ/control-plane", "not a spiffe id", ""} {
		a, b := spiffePartsCached(p), spiffePartsCached(p)
		if a.Compare(spiffeParts(p)) != 0 || a.Compare(b) != 0 {
			t.Errorf("%q: cached %v, fresh %v", p, a, spiffeParts(p))
		}
	}
}
