package xds

import (
	"context"
	"io"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	healthv3 "github.com/envoyproxy/go-control-plane/envoy/service/health/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// healthService takes data planes' reports of their own workload's health
// over Envoy's Health Discovery Service stream, used the other way round
// from HDS's design: writd assigns no checks (it answers with an empty
// specifier); a serving sidecar checks its local app and reports the
// result for its own endpoint. A node may only report for itself: the
// node id must be one this replica holds an ADS stream for, bound to the
// caller's SVID. Its endpoint is then HEALTHY in EDS only while it has
// ACKed its own listeners and its last report was healthy.
type healthService struct {
	healthv3.UnimplementedHealthDiscoveryServiceServer
	s *Server
}

func (h healthService) StreamHealthCheck(stream healthv3.HealthDiscoveryService_StreamHealthCheckServer) error {
	s := h.s
	caller, err := callerID(stream.Context())
	if err != nil {
		return err
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	nodeID := first.GetHealthCheckRequest().GetNode().GetId()
	if nodeID == "" {
		return status.Error(codes.InvalidArgument, "the first message must be a HealthCheckRequest naming the node")
	}
	s.mu.Lock()
	ns := s.nodes[nodeID]
	ok := ns != nil && ns.node.SPIFFEID == caller.String() && ns.node.Service != ""
	s.mu.Unlock()
	if !ok {
		return status.Errorf(codes.PermissionDenied, "%s holds no serving node %q on this replica (open its ADS stream first)", caller, nodeID)
	}
	if err := stream.Send(&healthv3.HealthCheckSpecifier{}); err != nil {
		return err
	}
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		r := msg.GetEndpointHealthResponse()
		if r == nil {
			continue
		}
		var statuses []corev3.HealthStatus
		for _, e := range r.GetEndpointsHealth() {
			statuses = append(statuses, e.GetHealthStatus())
		}
		for _, c := range r.GetClusterEndpointsHealth() {
			for _, l := range c.GetLocalityEndpointsHealth() {
				for _, e := range l.GetEndpointsHealth() {
					statuses = append(statuses, e.GetHealthStatus())
				}
			}
		}
		healthy := len(statuses) > 0
		for _, st := range statuses {
			if st != corev3.HealthStatus_HEALTHY {
				healthy = false
			}
		}
		if err := s.reportAppHealth(stream.Context(), nodeID, caller.String(), healthy); err != nil {
			return err
		}
	}
}

// reportAppHealth records what a node's data plane says of its app and
// updates the registry.
func (s *Server) reportAppHealth(ctx context.Context, nodeID, spiffeID string, healthy bool) error {
	s.mu.Lock()
	ns := s.nodes[nodeID]
	if ns == nil || ns.node.SPIFFEID != spiffeID {
		s.mu.Unlock()
		return status.Errorf(codes.FailedPrecondition, "node %q left", nodeID)
	}
	changed := ns.appDown == healthy
	ns.appDown = !healthy
	serving := ns.healthy && !ns.appDown
	s.mu.Unlock()
	if !changed {
		return nil
	}
	s.o.Log.Info("xds data plane reports its app", "node", nodeID, "healthy", healthy)
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := s.o.Store.SetHealthy(ctx, nodeID, spiffeID, serving); err != nil {
		s.o.Log.Error("xds record app health", "node", nodeID, "error", err)
		return status.Error(codes.Unavailable, "could not record the report")
	}
	return nil
}
