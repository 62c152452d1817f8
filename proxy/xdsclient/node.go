package xdsclient

import (
	"errors"
	"fmt"
	"net"
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// Node metadata keys writd's registry reads (package xds defines them;
// they are repeated here so that writ-proxy does not link the control
// plane, and a test keeps them equal).
const (
	metaProxy     = "WRIT_PROXY"
	metaNamespace = "WRIT_NAMESPACE"
	metaService   = "WRIT_SERVICE"
	metaLabels    = "WRIT_LABELS"
	metaAddress   = "WRIT_ADDRESS"
	metaPorts     = "WRIT_PORTS"
	metaAppPorts  = "WRIT_APP_PORTS"
)

// NodeOptions describe the workload to writd.
type NodeOptions struct {
	ID        string
	Namespace string
	// Service, if set, is the service this workload serves (its SPIFFE
	// ID's service account); Inbound is its mesh port (host:port, the
	// host being the address peers reach it at) and App the local
	// application (loopback host:port).
	Service string
	Inbound string
	App     string
	Labels  map[string]string
}

// Node builds the xDS node by which writd registers the workload: an
// Envoy-flavor node with its namespace and, for a serving workload, its
// service, labels, address and port, and the app's port when it differs.
func Node(o NodeOptions) (*corev3.Node, error) {
	if o.ID == "" || o.Namespace == "" {
		return nil, errors.New("node: id and namespace are required")
	}
	md := map[string]any{metaProxy: "envoy", metaNamespace: o.Namespace}
	if o.Service != "" {
		host, port, err := splitPort(o.Inbound)
		if err != nil {
			return nil, fmt.Errorf("node: inbound %q: %w", o.Inbound, err)
		}
		if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
			return nil, fmt.Errorf("node: inbound %q: the host must be the IP address peers reach this workload at", o.Inbound)
		}
		appHost, appPort, err := splitPort(o.App)
		if err != nil {
			return nil, fmt.Errorf("node: app %q: %w", o.App, err)
		}
		// writd's inbound route goes to the app on 127.0.0.1, as Envoy's.
		if appHost != "127.0.0.1" && appHost != "localhost" {
			return nil, fmt.Errorf("node: app %q: the app must listen on 127.0.0.1", o.App)
		}
		labels := map[string]any{}
		for k, v := range o.Labels {
			labels[k] = v
		}
		md[metaService], md[metaAddress], md[metaPorts], md[metaLabels] = o.Service, host, []any{float64(port)}, labels
		if appPort != port {
			md[metaAppPorts] = map[string]any{strconv.Itoa(port): float64(appPort)}
		}
	}
	s, err := structpb.NewStruct(md)
	if err != nil {
		return nil, fmt.Errorf("node metadata: %w", err)
	}
	return &corev3.Node{Id: o.ID, Metadata: s, UserAgentName: "writ-proxy"}, nil
}

func splitPort(hostport string) (string, int, error) {
	host, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, fmt.Errorf("port %q: want 1 to 65535", p)
	}
	return host, port, nil
}
