package xdsclient

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"github.com/writmesh/writ/proxy"
)

// Snapshot is one consistent set of the resources writd serves a node:
// every type at the same version.
type Snapshot struct {
	Version   string
	Listeners []*listenerv3.Listener
	Routes    []*routev3.RouteConfiguration
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
}

// Upstream is a local plaintext port for one service (--upstream).
type Upstream struct {
	// Name is a host the service's virtual host answers to ("orders",
	// "orders.shop" or "orders.shop:8080").
	Name    string
	Address string
}

// Local is what the sidecar adds of its own to writd's configuration:
// how the local application reaches the mesh. These are bindings on this
// host, which writd cannot know.
type Local struct {
	// Service is the local service, given to policy.
	Service string
	// OutboundPorts binds writd's per-port outbound listeners
	// (127.0.0.1:PORT for every service port in the mesh, as Envoy does).
	// Off, the application uses HTTPProxy or Upstreams instead; on a host
	// shared by several sidecars, or with the app on one of those ports,
	// they would collide.
	OutboundPorts bool
	// HTTPProxy, if set, is an HTTP proxy port routing by Host across the
	// virtual hosts of every outbound route configuration.
	HTTPProxy string
	Upstreams []Upstream
}

// Names of the listeners and route configurations Local adds.
const (
	HTTPProxyName      = "local:http_proxy"
	UpstreamNamePrefix = "local:upstream:"
)

// Translate turns a snapshot into the proxy's configuration. Anything the
// data plane cannot do faithfully is an error naming the resource and
// field: the reason of the NACK.
func Translate(s *Snapshot, l Local) (*proxy.Config, error) {
	ls, lerr := proxy.ListenersFromEnvoy(s.Listeners, s.Clusters, l.Service)
	var mesh []*clusterv3.Cluster
	for _, c := range s.Clusters {
		if !ls.AppClusters[c.GetName()] {
			mesh = append(mesh, c)
		}
	}
	cs, cerr := proxy.ClustersFromEnvoy(mesh, s.Endpoints)
	rs, rerr := proxy.RoutesFromEnvoy(s.Routes)
	if err := errors.Join(lerr, cerr, rerr); err != nil {
		return nil, err
	}
	cfg := &proxy.Config{Inbound: ls.Inbound, Routes: rs, Clusters: cs}
	if l.OutboundPorts {
		cfg.Outbound = ls.Outbound
	}
	// The virtual hosts of every outbound HTTP listener's routes: what
	// the app may reach by name.
	var vhosts []proxy.VirtualHost
	seen := map[string]bool{}
	byName := map[string]proxy.RouteConfig{}
	for _, rc := range rs {
		byName[rc.Name] = rc
	}
	outs := slices.Clone(ls.Outbound)
	slices.SortFunc(outs, func(a, b proxy.Outbound) int { return strings.Compare(a.Name, b.Name) })
	for _, o := range outs {
		if o.Protocol != "http" || seen["route:"+o.Route] {
			continue
		}
		seen["route:"+o.Route] = true
		for _, vh := range byName[o.Route].VirtualHosts {
			if !seen[vh.Name] {
				seen[vh.Name] = true
				vhosts = append(vhosts, vh)
			}
		}
	}
	if l.HTTPProxy != "" {
		cfg.Routes = append(cfg.Routes, proxy.RouteConfig{Name: HTTPProxyName, VirtualHosts: vhosts})
		cfg.Outbound = append(cfg.Outbound, proxy.Outbound{Name: HTTPProxyName, Address: l.HTTPProxy, Protocol: "http", Route: HTTPProxyName})
	}
	for _, u := range l.Upstreams {
		// A service not (yet) in the mesh gets a port without routes:
		// requests fail until writd sends it, rather than the whole
		// configuration being refused.
		rc := proxy.RouteConfig{Name: UpstreamNamePrefix + u.Name}
		for _, vh := range vhosts {
			if slices.ContainsFunc(vh.Domains, func(d string) bool { return strings.EqualFold(d, u.Name) }) {
				vh.Domains = []string{"*"}
				rc.VirtualHosts = []proxy.VirtualHost{vh}
				break
			}
		}
		// A service with no HTTP port but a TCP one: the upstream port
		// splices to it, as writd's TCP listener for it would.
		if len(rc.VirtualHosts) == 0 {
			if c := tcpCluster(outs, u.Name); c != "" {
				cfg.Outbound = append(cfg.Outbound, proxy.Outbound{Name: UpstreamNamePrefix + u.Name, Address: u.Address, Protocol: "tcp", Cluster: c})
				continue
			}
		}
		cfg.Routes = append(cfg.Routes, rc)
		cfg.Outbound = append(cfg.Outbound, proxy.Outbound{Name: UpstreamNamePrefix + u.Name, Address: u.Address, Protocol: "http", Route: rc.Name})
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("translated configuration: %w", err)
	}
	return cfg, nil
}

// tcpCluster is the cluster of writd's first TCP outbound listener for
// the service named name ("echo" or "echo.shop"); listeners are named
// outbound|tcp|NAME.NAMESPACE:PORT.
func tcpCluster(outs []proxy.Outbound, name string) string {
	for _, o := range outs {
		ref, ok := strings.CutPrefix(o.Name, "outbound|tcp|")
		if o.Protocol != "tcp" || !ok {
			continue
		}
		if i := strings.LastIndexByte(ref, ':'); i >= 0 {
			ref = ref[:i]
		}
		svc, _, _ := strings.Cut(ref, ".")
		if strings.EqualFold(ref, name) || strings.EqualFold(svc, name) {
			return o.Cluster
		}
	}
	return ""
}
