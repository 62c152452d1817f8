package xdsclient

import (
	"context"
	"net"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	healthv3 "github.com/envoyproxy/go-control-plane/envoy/service/health/v3"
	"google.golang.org/grpc"
)

// AppCheck probes the local app behind every inbound listener with a TCP
// connection, and the client reports the result to writd (over Envoy's
// HDS stream), which takes the workload's endpoint out of EDS while its
// app is down and puts it back when it recovers.
type AppCheck struct {
	// Interval between probes; zero disables checks and reports.
	Interval time.Duration
	// Timeout of one probe (default the smaller of Interval and 1 s).
	Timeout time.Duration
	// Threshold is how many results in a row flip the state (default 2).
	Threshold int
}

// AppHealthy reports the app check's current verdict (true before any
// check and without an inbound listener).
func (c *Client) AppHealthy() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.appDown
}

// runAppCheck probes the apps every Interval until ctx ends.
func (c *Client) runAppCheck(ctx context.Context) {
	ac := c.o.AppCheck
	tick := c.o.Clock.NewTicker(ac.Interval)
	defer tick.Stop()
	streak := 0 // results in a row that disagree with the current state
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.Chan():
		}
		c.mu.Lock()
		var apps []string
		if c.cfg != nil {
			for _, in := range c.cfg.Inbound {
				apps = append(apps, in.App)
			}
		}
		down := c.appDown
		c.mu.Unlock()
		if len(apps) == 0 {
			continue
		}
		ok := true
		for _, a := range apps {
			d := net.Dialer{Timeout: ac.Timeout}
			conn, err := d.DialContext(ctx, "tcp", a)
			if err != nil {
				ok = false
				break
			}
			conn.Close()
		}
		if ok != down { // agrees with the current state
			streak = 0
			continue
		}
		if streak++; streak < ac.Threshold {
			continue
		}
		streak = 0
		c.mu.Lock()
		c.appDown = !ok
		c.mu.Unlock()
		c.o.Log.Warn("local app health changed", "healthy", ok, "apps", apps)
		select {
		case c.appChanged <- struct{}{}:
		default:
		}
	}
}

// reportHealth keeps writd told of the app's health over an HDS stream
// on cc until ctx ends or the stream fails.
func (c *Client) reportHealth(ctx context.Context, cc *grpc.ClientConn) {
	st, err := healthv3.NewHealthDiscoveryServiceClient(cc).StreamHealthCheck(ctx)
	if err == nil {
		err = st.Send(&healthv3.HealthCheckRequestOrEndpointHealthResponse{RequestType: &healthv3.HealthCheckRequestOrEndpointHealthResponse_HealthCheckRequest{
			HealthCheckRequest: &healthv3.HealthCheckRequest{Node: c.o.Node}}})
	}
	if err != nil {
		c.o.Log.Warn("health reports to writd", "error", err)
		return
	}
	// writd assigns no checks; its specifiers are read and dropped.
	go func() {
		for {
			if _, err := st.Recv(); err != nil {
				if ctx.Err() == nil {
					c.o.Log.Warn("health reports to writd", "error", err)
				}
				return
			}
		}
	}()
	for {
		hs := corev3.HealthStatus_HEALTHY
		if !c.AppHealthy() {
			hs = corev3.HealthStatus_UNHEALTHY
		}
		var eps []*healthv3.EndpointHealth
		c.mu.Lock()
		if c.cfg != nil {
			for _, in := range c.cfg.Inbound {
				host, port, err := splitPort(in.Address)
				if err != nil {
					continue
				}
				eps = append(eps, &healthv3.EndpointHealth{HealthStatus: hs, Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
					SocketAddress: &corev3.SocketAddress{Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(port)}}}}}})
			}
		}
		c.mu.Unlock()
		if len(eps) > 0 {
			if err := st.Send(&healthv3.HealthCheckRequestOrEndpointHealthResponse{RequestType: &healthv3.HealthCheckRequestOrEndpointHealthResponse_EndpointHealthResponse{
				EndpointHealthResponse: &healthv3.EndpointHealthResponse{EndpointsHealth: eps}}}); err != nil {
				if ctx.Err() == nil {
					c.o.Log.Warn("health reports to writd", "error", err)
				}
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-c.appChanged:
		}
	}
}
