package xds

import (
	"encoding/json"
	"errors"
	"time"
)

// GRPCBootstrapOptions describes a proxyless gRPC workload for
// GRPCBootstrap.
type GRPCBootstrapOptions struct {
	// ServerURI is writd's gRPC address, host:port.
	ServerURI string
	NodeID    string
	// The workload's SVID, key and trust bundle as files (PEM), and the
	// bundle as a SPIFFE bundle map (JSON: {"trust_domains": {TD: bundle}})
	// for the xDS channel, since writd's SVID names it by URI only.
	CertFile, KeyFile, CAFile, BundleMapFile string
	Namespace                                string
	// Service, Address, Ports and Labels describe what it serves; leave
	// Service empty for a client only.
	Service string
	Address string
	Ports   []int
	Labels  map[string]string
	// Refresh is how often the file_watcher provider rereads the files
	// (default 10 s); the SVID is rotated by whoever writes them.
	Refresh time.Duration
}

// GRPCBootstrap returns a grpc-go xDS bootstrap (GRPC_XDS_BOOTSTRAP) for
// a workload: ADS to writd over mTLS with the workload's SVID, the
// file_watcher certificate provider named CertProviderInstance for data
// plane mTLS, and the server listener template writd serves. Run the
// workload with GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true.
func GRPCBootstrap(o GRPCBootstrapOptions) ([]byte, error) {
	if o.ServerURI == "" || o.NodeID == "" || o.CertFile == "" || o.KeyFile == "" || o.CAFile == "" || o.BundleMapFile == "" || o.Namespace == "" {
		return nil, errors.New("bootstrap needs the xDS server, node id, namespace, and SVID, key, CA and bundle map files")
	}
	if o.Service != "" && (o.Address == "" || len(o.Ports) == 0) {
		return nil, errors.New("a serving workload needs its address and ports")
	}
	if o.Refresh <= 0 {
		o.Refresh = 10 * time.Second
	}
	md := map[string]any{MetaProxy: string(FlavorGRPC), MetaNamespace: o.Namespace}
	if o.Service != "" {
		md[MetaService], md[MetaAddress], md[MetaPorts] = o.Service, o.Address, o.Ports
		labels := o.Labels
		if labels == nil {
			labels = map[string]string{}
		}
		md[MetaLabels] = labels
	}
	b := map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri": o.ServerURI,
			"channel_creds": []any{map[string]any{"type": "tls", "config": map[string]any{
				"certificate_file": o.CertFile, "private_key_file": o.KeyFile, "spiffe_trust_bundle_map_file": o.BundleMapFile}}},
			"server_features": []any{"xds_v3"},
		}},
		"node": map[string]any{"id": o.NodeID, "metadata": md},
		"certificate_providers": map[string]any{CertProviderInstance: map[string]any{"plugin_name": "file_watcher", "config": map[string]any{
			"certificate_file": o.CertFile, "private_key_file": o.KeyFile, "ca_certificate_file": o.CAFile,
			"refresh_interval": o.Refresh.String()}}},
		"server_listener_resource_name_template": ServerListenerPrefix + "%s",
	}
	return json.MarshalIndent(b, "", "  ")
}
