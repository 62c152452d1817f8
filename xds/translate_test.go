package xds

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"testing"

	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/writmesh/writ/config"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func loadMesh(t *testing.T, file string) *Mesh {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", file))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := config.DecodeMesh(file, data)
	if err != nil {
		t.Fatal(err)
	}
	if err := config.CheckMesh(rs); err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile("testdata/ca.pem")
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(caPEM)
	ca, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return &Mesh{TrustDomain: "example.org", Resources: rs, Bundle: []*x509.Certificate{ca}}
}

// TestBuildGolden translates each kind of configuration for each data-plane
// flavor and compares with testdata/*.golden.json (go test -update
// rewrites them). Build itself fails if any resource fails Validate().
func TestBuildGolden(t *testing.T) {
	greeterV1 := Endpoint{NodeID: "g1", Service: "greeter", Namespace: "demo", Labels: map[string]string{"version": "v1"}, Address: "10.0.0.1", Ports: []int{50051}, Healthy: true}
	greeterV2 := Endpoint{NodeID: "g2", Service: "greeter", Namespace: "demo", Labels: map[string]string{"version": "v2"}, Address: "10.0.0.2", Ports: []int{40000}}
	client := Node{ID: "client", SPIFFEID: "spiffe://example.org/ns/demo/sa/client", Namespace: "demo"}
	server := Node{ID: "g1", SPIFFEID: "spiffe://example.org/ns/demo/sa/greeter", Namespace: "demo", Service: "greeter", Labels: map[string]string{"version": "v1"}, Address: "10.0.0.1", Ports: []int{50051}}
	// A sidecar sharing the host with its app: mesh port 15006, app on 8080.
	sidecar := Node{ID: "g1", SPIFFEID: "spiffe://example.org/ns/demo/sa/greeter", Namespace: "demo", Service: "greeter", Labels: map[string]string{"version": "v1"}, Address: "127.0.0.1", Ports: []int{15006}, AppPorts: map[int]int{15006: 8080}}
	tests := []struct {
		name, file string
		node       Node
		flavor     Flavor
		endpoints  []Endpoint
	}{
		{"basic-grpc", "basic.yaml", client, FlavorGRPC, nil},
		{"basic-envoy", "basic.yaml", client, FlavorEnvoy, nil},
		{"split-grpc", "split.yaml", client, FlavorGRPC, []Endpoint{greeterV1, greeterV2}},
		{"split-envoy", "split.yaml", client, FlavorEnvoy, []Endpoint{greeterV1, greeterV2}},
		{"policy-envoy", "policy.yaml", client, FlavorEnvoy, nil},
		{"authz-grpc-server", "authz.yaml", server, FlavorGRPC, []Endpoint{greeterV1}},
		{"authz-envoy-server", "authz.yaml", server, FlavorEnvoy, []Endpoint{greeterV1}},
		// Several enforced policies: one ext_authz check naming all their
		// decisions, every one of which must allow.
		{"authz-several-envoy-server", "authz-several.yaml", server, FlavorEnvoy, []Endpoint{greeterV1}},
		{"noauthz-grpc-server", "split.yaml", server, FlavorGRPC, []Endpoint{greeterV1}},
		{"authz-mixed-grpc-server", "authz-mixed.yaml", server, FlavorGRPC, []Endpoint{greeterV1}},
		// One enforced policy and one in dry-run beside it: the check
		// names the dry-run decision too (writ.authz_dry_run).
		{"authz-mixed-envoy-server", "authz-mixed.yaml", server, FlavorEnvoy, []Endpoint{greeterV1}},
		// Policies that read the request body: ext_authz with_request_body.
		{"authz-body-envoy-server", "authz-body.yaml", server, FlavorEnvoy, []Endpoint{greeterV1}},
		{"tcp-envoy", "tcp.yaml", client, FlavorEnvoy, nil},
		{"sidecar-envoy-server", "split.yaml", sidecar, FlavorEnvoy, []Endpoint{greeterV1, greeterV2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := loadMesh(t, tt.file)
			m.Endpoints = tt.endpoints
			n := tt.node
			n.Flavor = tt.flavor
			rs, err := Build(m, n)
			if err != nil {
				t.Fatal(err)
			}
			got := render(t, rs)
			path := filepath.Join("testdata", tt.name+".golden.json")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./xds -run TestBuildGolden -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the golden file; got:\n%s", path, got)
			}
			if v1, v2 := rs.Version(), mustBuild(t, m, n).Version(); v1 != v2 {
				t.Errorf("Version not stable: %s, %s", v1, v2)
			}
		})
	}
}

func mustBuild(t *testing.T, m *Mesh, n Node) Resources {
	rs, err := Build(m, n)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// render writes the resources as JSON, by type URL and then name.
func render(t *testing.T, rs Resources) []byte {
	t.Helper()
	out := map[string][]json.RawMessage{}
	for typ, list := range rs {
		list = slices.Clone(list)
		sort.Slice(list, func(i, j int) bool { return cacheName(list[i]) < cacheName(list[j]) })
		for _, r := range list {
			b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			var v any
			_ = json.Unmarshal(b, &v) // re-encode: protojson's spacing is unstable by design
			b, _ = json.Marshal(v)
			out[typ] = append(out[typ], b)
		}
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return append(b, '\n')
}

func TestAuthzContext(t *testing.T) {
	pol := func(pkg, decision, mode string) *config.AuthorizationPolicySpec {
		return &config.AuthorizationPolicySpec{Service: "s", Package: pkg, Decision: decision, Mode: mode}
	}
	tests := []struct {
		name     string
		policies []*config.AuthorizationPolicySpec
		mode     string
		decision string
		dryRun   string
	}{
		{"none", nil, "", "", ""},
		{"enforce, default decision", []*config.AuthorizationPolicySpec{pol("writ.authz", "", config.ModeEnforce)}, "enforce", "data.writ.authz.allow", ""},
		{"dry-run only", []*config.AuthorizationPolicySpec{pol("a", "ok", config.ModeDryRun), pol("b", "", config.ModeDryRun)}, "dry-run", "data.a.ok,data.b.allow", ""},
		{"enforced ones decide, dry-run ones beside", []*config.AuthorizationPolicySpec{pol("b", "", config.ModeEnforce), pol("y", "", config.ModeDryRun), pol("a", "", config.ModeEnforce), pol("a", "", config.ModeEnforce), pol("x", "", config.ModeDryRun)},
			"enforce", "data.a.allow,data.b.allow", "data.x.allow,data.y.allow"},
		{"enforced query not run dry", []*config.AuthorizationPolicySpec{pol("a", "", config.ModeEnforce), pol("a", "", config.ModeDryRun)}, "enforce", "data.a.allow", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := authzContext(tt.policies)
			_, hasDry := got[AuthzDryRunContextKey]
			if got[AuthzModeContextKey] != tt.mode || got[AuthzDecisionContextKey] != tt.decision || got[AuthzDryRunContextKey] != tt.dryRun || hasDry != (tt.dryRun != "") || (tt.mode == "") != (got == nil) {
				t.Fatalf("got %v, want mode %q decision %q dry run %q", got, tt.mode, tt.decision, tt.dryRun)
			}
		})
	}
}

// TestRequestBody checks how the body settings of several policies bound
// to one service combine into the one ext_authz filter's.
func TestRequestBody(t *testing.T) {
	pol := func(b *config.RequestBody) *config.AuthorizationPolicySpec {
		return &config.AuthorizationPolicySpec{Package: "writ.p", Mode: config.ModeEnforce, RequestBody: b}
	}
	tests := []struct {
		name     string
		policies []*config.AuthorizationPolicySpec
		want     *extauthzv3.BufferSettings
	}{
		{"none", nil, nil},
		{"no policy asks", []*config.AuthorizationPolicySpec{pol(nil)}, nil},
		{"one", []*config.AuthorizationPolicySpec{pol(nil), pol(&config.RequestBody{MaxBytes: 100})},
			&extauthzv3.BufferSettings{MaxRequestBytes: 100}},
		{"largest, partial only if all allow", []*config.AuthorizationPolicySpec{
			pol(&config.RequestBody{MaxBytes: 100, AllowPartialMessage: true}),
			pol(&config.RequestBody{MaxBytes: 50}),
		}, &extauthzv3.BufferSettings{MaxRequestBytes: 100}},
		{"partial when all allow, bytes when any asks", []*config.AuthorizationPolicySpec{
			pol(&config.RequestBody{MaxBytes: 10, AllowPartialMessage: true, PackAsBytes: true}),
			pol(&config.RequestBody{MaxBytes: 50, AllowPartialMessage: true}),
		}, &extauthzv3.BufferSettings{MaxRequestBytes: 50, AllowPartialMessage: true, PackAsBytes: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := requestBody(tt.policies); !proto.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}
