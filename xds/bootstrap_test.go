package xds

import (
	"encoding/json"
	"testing"
)

func TestGRPCBootstrap(t *testing.T) {
	base := GRPCBootstrapOptions{ServerURI: "127.0.0.1:8443", NodeID: "n1", Namespace: "demo", CertFile: "c", KeyFile: "k", CAFile: "ca", BundleMapFile: "bm"}
	tests := []struct {
		name    string
		mod     func(*GRPCBootstrapOptions)
		wantErr bool
	}{
		{"client", func(*GRPCBootstrapOptions) {}, false},
		{"server", func(o *GRPCBootstrapOptions) { o.Service, o.Address, o.Ports = "greeter", "10.0.0.1", []int{50051} }, false},
		{"server without ports", func(o *GRPCBootstrapOptions) { o.Service, o.Address = "greeter", "10.0.0.1" }, true},
		{"no server", func(o *GRPCBootstrapOptions) { o.ServerURI = "" }, true},
		{"no key", func(o *GRPCBootstrapOptions) { o.KeyFile = "" }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := base
			tt.mod(&o)
			b, err := GRPCBootstrap(o)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			var v struct {
				Node struct {
					ID       string         `json:"id"`
					Metadata map[string]any `json:"metadata"`
				} `json:"node"`
				Template string `json:"server_listener_resource_name_template"`
			}
			if err := json.Unmarshal(b, &v); err != nil {
				t.Fatal(err)
			}
			if v.Node.ID != "n1" || v.Node.Metadata[MetaProxy] != "grpc" || v.Template != ServerListenerPrefix+"%s" {
				t.Fatalf("bootstrap: %s", b)
			}
			if _, serving := v.Node.Metadata[MetaService]; serving != (o.Service != "") {
				t.Fatalf("service metadata present = %v for %q", serving, o.Service)
			}
		})
	}
}
