package main

import (
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestXDSNode: what writ-proxy tells writd comes from its SVID and flags,
// and claims its SVID does not back are refused before writd sees them.
func TestXDSNode(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/orders")
	o := &proxyOptions{xdsServer: "writd:8081", inbound: "10.0.0.5:15006", app: "127.0.0.1:8080", version: "v2", labels: "tier=back", httpProxy: "127.0.0.1:15001"}
	node, local, serverID, err := o.xdsNode(id)
	if err != nil {
		t.Fatal(err)
	}
	if serverID.String() != "spiffe://example.org/writ/control-plane" {
		t.Errorf("server id %s", serverID)
	}
	md := node.GetMetadata().GetFields()
	if md["WRIT_SERVICE"].GetStringValue() != "orders" || md["WRIT_NAMESPACE"].GetStringValue() != "shop" || md["WRIT_ADDRESS"].GetStringValue() != "10.0.0.5" {
		t.Errorf("metadata %v", md)
	}
	if l := md["WRIT_LABELS"].GetStructValue().GetFields(); l["version"].GetStringValue() != "v2" || l["tier"].GetStringValue() != "back" {
		t.Errorf("labels %v", l)
	}
	if !strings.HasPrefix(node.GetId(), "orders.shop~") || !strings.HasSuffix(node.GetId(), "~10.0.0.5:15006") {
		t.Errorf("node id %q", node.GetId())
	}
	if local.Service != "orders" || local.HTTPProxy != "127.0.0.1:15001" || local.OutboundPorts {
		t.Errorf("local %+v", local)
	}
	// A client only: no service claimed.
	c := &proxyOptions{xdsServer: "w:1", upstreams: multiFlag{"orders=127.0.0.1:9001"}, xdsServerID: "spiffe://example.org/custom"}
	node, local, serverID, err = c.xdsNode(spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/frontend"))
	if err != nil {
		t.Fatal(err)
	}
	if node.GetMetadata().GetFields()["WRIT_SERVICE"] != nil || serverID.String() != "spiffe://example.org/custom" || len(local.Upstreams) != 1 {
		t.Errorf("client node %v, server %s, local %+v", node, serverID, local)
	}
	for name, tt := range map[string]struct {
		o    proxyOptions
		id   string
		want string
	}{
		"other namespace": {proxyOptions{namespace: "prod"}, "spiffe://example.org/ns/shop/sa/orders", "--namespace"},
		"other service":   {proxyOptions{inbound: "10.0.0.5:1", app: "127.0.0.1:2", service: "payments"}, "spiffe://example.org/ns/shop/sa/orders", "may only serve"},
		"not a workload":  {proxyOptions{}, "spiffe://example.org/node/n1", "not a workload identity"},
		"app off-host":    {proxyOptions{inbound: "10.0.0.5:1", app: "10.0.0.6:2"}, "spiffe://example.org/ns/shop/sa/orders", "127.0.0.1"},
	} {
		if _, _, _, err := tt.o.xdsNode(spiffeid.RequireFromString(tt.id)); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, tt.want)
		}
	}
}
