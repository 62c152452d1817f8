package xds

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	endpointservice "github.com/envoyproxy/go-control-plane/envoy/service/endpoint/v3"
	healthv3 "github.com/envoyproxy/go-control-plane/envoy/service/health/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	routeservice "github.com/envoyproxy/go-control-plane/envoy/service/route/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/writmesh/writ/internal/svidpeer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// Node metadata keys a data plane sets in its bootstrap.
const (
	MetaProxy     = "WRIT_PROXY"     // "grpc" (proxyless) or "envoy"
	MetaNamespace = "WRIT_NAMESPACE" // must be the namespace of the caller's SPIFFE ID
	MetaService   = "WRIT_SERVICE"   // the service it serves (must be its service account); empty for clients only
	MetaLabels    = "WRIT_LABELS"    // struct of string labels, e.g. {"version": "v1"}
	MetaAddress   = "WRIT_ADDRESS"   // IP the workload serves on
	MetaPorts     = "WRIT_PORTS"     // list of port numbers
	// MetaAppPorts maps mesh ports to the local application's ports
	// ({"15006": 8080}) when they differ; Envoy-flavor nodes only.
	MetaAppPorts = "WRIT_APP_PORTS"
)

// ServerOptions configures the xDS server.
type ServerOptions struct {
	Store       *Store
	Pool        *pgxpool.Pool // for LISTEN; usually the Store's pool
	TrustDomain spiffeid.TrustDomain
	// Bundle returns the current X.509 trust anchors.
	Bundle  func(ctx context.Context) ([]*x509.Certificate, error)
	Replica string
	// Grace is how long a workload stays registered after its last stream
	// ends (default 30 s).
	Grace   time.Duration
	Clock   clockwork.Clock
	Log     *slog.Logger
	Metrics prometheus.Registerer
	// Resync rebuilds everything this often even without a change, to pick
	// up bundle rotations and missed notifications (default 1 min).
	Resync time.Duration
}

// Server serves ADS and SDS (state of the world, and delta) from per-node snapshots
// built from the mesh configuration and registry. Every node is
// authenticated by its SVID: its node id is bound to that identity, its
// namespace and service must match it, and it only ever receives the
// snapshot built for it. Safe for concurrent use.
type Server struct {
	o     ServerOptions
	cache cachev3.SnapshotCache
	xds   serverv3.Server

	mu      sync.Mutex
	streams map[int64]*streamState
	nodes   map[string]*nodeState
	mesh    *Mesh

	kick chan struct{}

	nacks     *prometheus.CounterVec
	pushes    prometheus.Counter
	connected prometheus.Gauge
	rebuilds  prometheus.Histogram
}

type streamState struct {
	spiffeID spiffeid.ID
	nodeID   string
}

type nodeState struct {
	node     Node
	streams  int
	version  string // of the snapshot currently set
	current  *cachev3.Snapshot
	acked    string
	lastGood *cachev3.Snapshot
	bad      string // version the node refused; never pushed again
	// badSnap is the refused snapshot, kept in case the node takes it
	// after all (its policy reload defined the rule it bound) and ACKs
	// it, until a newer snapshot is pushed; badInbound is its hasInbound.
	badSnap    *cachev3.Snapshot
	badInbound bool
	lastErr    string
	// hasInbound: the current snapshot holds the node's own inbound
	// listeners; healthy: it ACKed such a snapshot; appDown: its data
	// plane last reported its app unhealthy (StreamHealthCheck).
	hasInbound, healthy, appDown bool
}

// NewServer returns the xDS server; Register it on a gRPC server and Run it.
// Its streams end when ctx does, so a graceful gRPC stop is not held up by
// data planes that never hang up.
func NewServer(ctx context.Context, o ServerOptions) *Server {
	if o.Clock == nil {
		o.Clock = clockwork.NewRealClock()
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Grace <= 0 {
		o.Grace = 30 * time.Second
	}
	if o.Resync <= 0 {
		o.Resync = time.Minute
	}
	s := &Server{
		o: o,
		// Not in ADS mode: the ADS-mode cache never answers a request that
		// names only some of a snapshot's resources, and grpc-go always
		// asks by name. The snapshots are per node, so every named
		// resource a node may ask for is in its own snapshot.
		cache:   cachev3.NewSnapshotCache(false, cachev3.IDHash{}, nil),
		streams: map[int64]*streamState{},
		nodes:   map[string]*nodeState{},
		kick:    make(chan struct{}, 1),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "writ_xds_nacks_total",
			Help: "xDS responses data planes refused, by type URL."}, []string{"type_url"}),
		pushes: prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_xds_pushes_total",
			Help: "New snapshots set for connected nodes."}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{Name: "writ_xds_connected_nodes",
			Help: "Nodes with at least one xDS stream to this replica."}),
		rebuilds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "writ_xds_rebuild_seconds",
			Help: "Time to load the mesh and rebuild every connected node's snapshot.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)}),
	}
	if o.Metrics != nil {
		o.Metrics.MustRegister(s.nacks, s.pushes, s.connected, s.rebuilds)
	}
	s.xds = serverv3.NewServer(ctx, s.cache, serverv3.CallbackFuncs{
		StreamOpenFunc:    s.onStreamOpen,
		StreamClosedFunc:  s.onStreamClosed,
		StreamRequestFunc: s.onStreamRequest,
		// Delta streams count their ids apart from state-of-the-world
		// ones; they are kept under negative ids here.
		DeltaStreamOpenFunc: func(ctx context.Context, id int64, typeURL string) error {
			return s.onStreamOpen(ctx, -id, typeURL)
		},
		DeltaStreamClosedFunc: func(id int64, n *corev3.Node) { s.onStreamClosed(-id, n) },
		StreamDeltaRequestFunc: func(id int64, req *discoverygrpc.DeltaDiscoveryRequest) error {
			// Delta has no version in requests: a request answering a
			// response (a nonce, no error) acknowledges the latest push.
			return s.onRequest(-id, req.GetNode(), req.GetTypeUrl(), req.GetErrorDetail().GetMessage(), req.GetErrorDetail() != nil, "", req.GetResponseNonce() != "")
		},
		FetchRequestFunc: func(context.Context, *discoverygrpc.DiscoveryRequest) error {
			return status.Error(codes.Unimplemented, "REST/fetch xDS is not served; use ADS")
		},
	})
	return s
}

// Register adds ADS, the per-type discovery services, SDS and the health
// reports of data planes (HDS) to g.
func (s *Server) Register(g *grpc.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
	listenerservice.RegisterListenerDiscoveryServiceServer(g, s.xds)
	routeservice.RegisterRouteDiscoveryServiceServer(g, s.xds)
	clusterservice.RegisterClusterDiscoveryServiceServer(g, s.xds)
	endpointservice.RegisterEndpointDiscoveryServiceServer(g, s.xds)
	secretservice.RegisterSecretDiscoveryServiceServer(g, s.xds)
	healthv3.RegisterHealthDiscoveryServiceServer(g, healthService{s: s})
}

// Kick asks for a rebuild (coalesced with pending ones).
func (s *Server) Kick() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// callerID is the SPIFFE ID of the stream's verified client certificate.
func callerID(ctx context.Context) (spiffeid.ID, error) {
	return svidpeer.FromGRPC(ctx, "xDS needs the workload's X.509 SVID as a client certificate")
}

func (s *Server) onStreamOpen(ctx context.Context, id int64, typeURL string) error {
	caller, err := callerID(ctx)
	if err != nil {
		return err
	}
	if caller.TrustDomain() != s.o.TrustDomain {
		return status.Errorf(codes.PermissionDenied, "%s is outside trust domain %s", caller, s.o.TrustDomain)
	}
	s.mu.Lock()
	s.streams[id] = &streamState{spiffeID: caller}
	s.mu.Unlock()
	return nil
}

// workloadOf splits spiffe://td/ns/NS/sa/SA.
func workloadOf(id spiffeid.ID) (ns, sa string, ok bool) {
	p := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(p) != 4 || p[0] != "ns" || p[2] != "sa" || p[1] == "" || p[3] == "" {
		return "", "", false
	}
	return p[1], p[3], true
}

// nodeFrom checks a node's claims against its identity.
func (s *Server) nodeFrom(caller spiffeid.ID, cn *corev3.Node) (Node, error) {
	if cn.GetId() == "" {
		return Node{}, status.Error(codes.InvalidArgument, "node id is empty")
	}
	if len(cn.GetId()) > 256 {
		return Node{}, status.Error(codes.InvalidArgument, "node id is longer than 256 bytes")
	}
	ns, sa, ok := workloadOf(caller)
	if !ok {
		return Node{}, status.Errorf(codes.PermissionDenied, "%s is not a workload identity (spiffe://TD/ns/NS/sa/SA)", caller)
	}
	md := cn.GetMetadata().GetFields()
	str := func(k string) string { return md[k].GetStringValue() }
	n := Node{ID: cn.GetId(), SPIFFEID: caller.String(), Namespace: ns, Flavor: FlavorEnvoy, Labels: map[string]string{}}
	switch f := str(MetaProxy); f {
	case "", string(FlavorEnvoy):
	case string(FlavorGRPC):
		n.Flavor = FlavorGRPC
	default:
		return Node{}, status.Errorf(codes.InvalidArgument, "node metadata %s=%q: want grpc or envoy", MetaProxy, f)
	}
	if v := str(MetaNamespace); v != "" && v != ns {
		return Node{}, status.Errorf(codes.PermissionDenied, "node claims namespace %q but %s is in namespace %q", v, caller, ns)
	}
	if v := str(MetaService); v != "" {
		if v != sa {
			return Node{}, status.Errorf(codes.PermissionDenied, "node claims service %q but %s may only serve %q", v, caller, sa)
		}
		n.Service = v
		n.Address = str(MetaAddress)
		if n.Address == "" {
			return Node{}, status.Errorf(codes.InvalidArgument, "node serving %q needs %s", v, MetaAddress)
		}
		for _, pv := range md[MetaPorts].GetListValue().GetValues() {
			p := int(pv.GetNumberValue())
			if pv.GetStringValue() != "" {
				p, _ = strconv.Atoi(pv.GetStringValue())
			}
			if p < 1 || p > 65535 {
				return Node{}, status.Errorf(codes.InvalidArgument, "node metadata %s: %v is not a port", MetaPorts, pv.AsInterface())
			}
			n.Ports = append(n.Ports, p)
		}
		if len(n.Ports) == 0 || len(n.Ports) > 64 {
			return Node{}, status.Errorf(codes.InvalidArgument, "node serving %q needs 1 to 64 %s", v, MetaPorts)
		}
		for k, v := range md[MetaAppPorts].GetStructValue().GetFields() {
			mp, err := strconv.Atoi(k)
			ap := int(v.GetNumberValue())
			if err != nil || !slices.Contains(n.Ports, mp) || ap < 1 || ap > 65535 || float64(ap) != v.GetNumberValue() {
				return Node{}, status.Errorf(codes.InvalidArgument, "node metadata %s: %q: %v: want one of %s mapped to a port number", MetaAppPorts, k, v.AsInterface(), MetaPorts)
			}
			if n.AppPorts == nil {
				n.AppPorts = map[int]int{}
			}
			n.AppPorts[mp] = ap
		}
		labels := md[MetaLabels].GetStructValue().GetFields()
		if len(labels) > 32 {
			return Node{}, status.Errorf(codes.InvalidArgument, "node metadata %s: more than 32 labels", MetaLabels)
		}
		for k, lv := range labels {
			if len(k) > 63 || len(lv.GetStringValue()) > 253 {
				return Node{}, status.Errorf(codes.InvalidArgument, "node metadata %s: label %.63q is too long", MetaLabels, k)
			}
			n.Labels[k] = lv.GetStringValue()
		}
	}
	return n, nil
}

func (s *Server) onStreamRequest(id int64, req *discoverygrpc.DiscoveryRequest) error {
	return s.onRequest(id, req.GetNode(), req.GetTypeUrl(), req.GetErrorDetail().GetMessage(), req.GetErrorDetail() != nil, req.GetVersionInfo(), false)
}

// onRequest handles a request of either protocol: the first binds the
// stream to its node; later ones are ACKs (version equal to the one pushed,
// or ackLatest for delta) or NACKs.
func (s *Server) onRequest(id int64, node *corev3.Node, typeURL, nackMsg string, nack bool, version string, ackLatest bool) error {
	s.mu.Lock()
	st := s.streams[id]
	if st == nil {
		s.mu.Unlock()
		return status.Error(codes.Unauthenticated, "unknown stream")
	}
	if st.nodeID == "" {
		s.mu.Unlock()
		if err := s.joinNode(st, node); err != nil {
			s.o.Log.Warn("xds node refused", "spiffe_id", st.spiffeID.String(), "node", node.GetId(), "error", err)
			return err
		}
		s.mu.Lock()
	}
	ns := s.nodes[st.nodeID]
	if node.GetId() != "" && node.GetId() != st.nodeID {
		s.mu.Unlock()
		return status.Error(codes.InvalidArgument, "node id changed on the stream")
	}
	var revert, restore *cachev3.Snapshot
	if ns != nil {
		switch {
		case nack:
			// A NACK: the node keeps its last good config. Record why,
			// never push this version to it again, and put the last good
			// snapshot back so later requests get consistent answers.
			ns.lastErr = fmt.Sprintf("%s: %s", typeURL, nackMsg)
			s.nacks.WithLabelValues(typeURL).Inc()
			s.o.Log.Error("xds config refused by node", "node", st.nodeID, "spiffe_id", st.spiffeID.String(), "type_url", typeURL, "version", ns.version, "error", nackMsg)
			if ns.version != "" && ns.version != ns.acked {
				ns.bad, ns.badSnap, ns.badInbound = ns.version, ns.current, ns.hasInbound
				if ns.lastGood != nil {
					revert = ns.lastGood
					ns.current, ns.version = ns.lastGood, ns.acked
				}
			}
		case version != "" && version == ns.bad && ns.badSnap != nil:
			// The node ACKs the version it refused: a policy reload made
			// it apply (xdsclient.RetryRefused). It is in force there, so
			// it is current again, and the cache gets it back so that
			// the node is not sent the reverted one.
			ns.version, ns.current, ns.hasInbound = ns.bad, ns.badSnap, ns.badInbound
			ns.bad, ns.badSnap, ns.lastErr = "", nil, ""
			restore = ns.current
			s.o.Log.Info("xds config refused before now taken by node", "node", st.nodeID, "spiffe_id", st.spiffeID.String(), "version", ns.version)
			fallthrough
		case ackLatest || (version != "" && version == ns.version):
			if ns.acked != ns.version {
				ns.acked, ns.lastGood = ns.version, ns.current
			}
			if ns.node.Service != "" && !ns.healthy && ns.hasInbound {
				// It has taken its own listeners: it can serve now,
				// unless its data plane reports its app down.
				ns.healthy = true
				n, serving := ns.node, !ns.appDown
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					if err := s.o.Store.SetHealthy(ctx, n.ID, n.SPIFFEID, serving); err != nil {
						s.o.Log.Error("xds mark node healthy", "node", n.ID, "error", err)
					}
				}()
			}
		}
	}
	nodeID := st.nodeID
	s.mu.Unlock()
	if revert != nil {
		if err := s.cache.SetSnapshot(context.Background(), nodeID, revert); err != nil {
			s.o.Log.Error("xds revert to last good snapshot", "node", nodeID, "error", err)
		}
	}
	if restore != nil {
		if err := s.cache.SetSnapshot(context.Background(), nodeID, restore); err != nil {
			s.o.Log.Error("xds restore snapshot taken after refusal", "node", nodeID, "error", err)
		}
	}
	return nil
}

// joinNode binds the stream to its node, registers the workload and gives
// the node its snapshot.
func (s *Server) joinNode(st *streamState, cn *corev3.Node) error {
	n, err := s.nodeFrom(st.spiffeID, cn)
	if err != nil {
		return err
	}
	s.mu.Lock()
	ns := s.nodes[n.ID]
	if ns != nil && ns.node.SPIFFEID != n.SPIFFEID {
		s.mu.Unlock()
		return status.Errorf(codes.PermissionDenied, "node id %q is in use by another identity", n.ID)
	}
	if ns == nil {
		ns = &nodeState{node: n}
		s.nodes[n.ID] = ns
		s.connected.Inc()
	} else if ns.bad != "" {
		// The node comes back on a new stream (its old one may linger
		// here, half-open, after the node gave it up) with a version
		// refused: it may have reloaded its policy meanwhile, or taken the
		// refused version and lost its ACK with the old stream. Offer the
		// current build again instead of the reverted one, which would
		// leave the node behind for good: a node that still refuses it
		// NACKs it again, with its reason, and gets the last good back.
		ns.bad, ns.badSnap = "", nil
	}
	ns.streams++
	st.nodeID = n.ID
	mesh := s.mesh
	s.mu.Unlock()
	if n.Service != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := s.o.Store.Register(ctx, s.o.Replica, Endpoint{NodeID: n.ID, SPIFFEID: n.SPIFFEID, Service: n.Service, Namespace: n.Namespace, Labels: n.Labels, Address: n.Address, Ports: n.Ports})
		if err != nil {
			s.dropStream(st)
			s.mu.Lock()
			st.nodeID = ""
			s.mu.Unlock()
			if errors.Is(err, ErrNodeClaimed) {
				return status.Error(codes.PermissionDenied, err.Error())
			}
			return status.Error(codes.Unavailable, "registration failed")
		}
		s.Kick()
	}
	if mesh != nil {
		s.buildNode(mesh, n.ID)
	} else {
		s.Kick()
	}
	return nil
}

func (s *Server) dropStream(st *streamState) (left *Node) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ns := s.nodes[st.nodeID]
	if ns == nil {
		return nil
	}
	ns.streams--
	if ns.streams > 0 {
		return nil
	}
	delete(s.nodes, st.nodeID)
	s.connected.Dec()
	s.cache.ClearSnapshot(st.nodeID)
	n := ns.node
	return &n
}

func (s *Server) onStreamClosed(id int64, _ *corev3.Node) {
	s.mu.Lock()
	st := s.streams[id]
	delete(s.streams, id)
	s.mu.Unlock()
	if st == nil || st.nodeID == "" {
		return
	}
	n := s.dropStream(st)
	if n == nil || n.Service == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.o.Store.Leave(ctx, n.ID, n.SPIFFEID, s.o.Grace); err != nil {
		s.o.Log.Error("xds node leave", "node", n.ID, "error", err)
	}
}

// buildNode sets a node's snapshot from mesh unless the node already has
// that content or refused it before.
func (s *Server) buildNode(mesh *Mesh, nodeID string) {
	s.mu.Lock()
	ns := s.nodes[nodeID]
	if ns == nil {
		s.mu.Unlock()
		return
	}
	n := ns.node
	s.mu.Unlock()
	rs, err := Build(mesh, n)
	if err != nil {
		s.o.Log.Error("xds build", "node", nodeID, "error", err)
		return
	}
	s.setNode(nodeID, rs)
}

func (s *Server) setNode(nodeID string, rs Resources) {
	version := rs.Version()
	s.mu.Lock()
	ns := s.nodes[nodeID]
	if ns == nil || ns.version == version || ns.bad == version {
		s.mu.Unlock()
		return
	}
	// Envoy-flavor nodes subscribe by type (wildcard) and writ-proxy
	// waits for a consistent set of every type: each type gets a version
	// even with no resources, since the snapshot cache never answers for
	// a type the snapshot lacks. gRPC clients ask by name and are better
	// left waiting than told a resource does not exist.
	full := rs
	if ns.node.Flavor == FlavorEnvoy {
		full = make(Resources, len(rs)+5)
		for _, t := range []resource.Type{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType, resource.SecretType} {
			full[t] = []types.Resource{}
		}
		maps.Copy(full, rs)
	}
	snap, err := cachev3.NewSnapshot(version, full)
	if err != nil {
		s.mu.Unlock()
		s.o.Log.Error("xds snapshot", "node", nodeID, "error", err)
		return
	}
	// Consistent() is advisory here: it does not follow ApiListener, the
	// form gRPC clients use, so its complaints are logged at debug only.
	if err := snap.Consistent(); err != nil {
		s.o.Log.Debug("xds snapshot not self-consistent", "node", nodeID, "error", err)
	}
	ns.version, ns.current = version, snap
	ns.hasInbound = hasInbound(rs, ns.node)
	// A newer snapshot supersedes the refused one: an ACK of the refused
	// version arriving now (a RetryRefused that crossed this push) must
	// not put it back over this one.
	ns.badSnap = nil
	s.mu.Unlock()
	if err := s.cache.SetSnapshot(context.Background(), nodeID, snap); err != nil {
		s.o.Log.Error("xds set snapshot", "node", nodeID, "error", err)
		return
	}
	s.pushes.Inc()
}

// rebuild loads the mesh and rebuilds every connected node. Nodes with
// the same inputs share one build.
func (s *Server) rebuild(ctx context.Context) error {
	start := time.Now()
	_, rs, err := s.o.Store.Load(ctx)
	if err != nil {
		return err
	}
	eps, err := s.o.Store.Endpoints(ctx)
	if err != nil {
		return err
	}
	var bundle []*x509.Certificate
	if s.o.Bundle != nil {
		if bundle, err = s.o.Bundle(ctx); err != nil {
			return fmt.Errorf("bundle: %w", err)
		}
	}
	mesh := &Mesh{TrustDomain: s.o.TrustDomain.Name(), Resources: rs, Endpoints: eps, Bundle: bundle}
	s.mu.Lock()
	s.mesh = mesh
	nodes := make([]Node, 0, len(s.nodes))
	for _, ns := range s.nodes {
		nodes = append(nodes, ns.node)
	}
	s.mu.Unlock()
	built := map[string]Resources{}
	for _, n := range nodes {
		key := fmt.Sprintf("%s|%s|%s|%s|%v|%v|%v", n.Flavor, n.Namespace, n.Service, n.Address, n.Ports, n.Labels, n.AppPorts)
		res, ok := built[key]
		if !ok {
			if res, err = Build(mesh, n); err != nil {
				s.o.Log.Error("xds build", "node", n.ID, "error", err)
				continue
			}
			built[key] = res
		}
		s.setNode(n.ID, res)
	}
	s.rebuilds.Observe(time.Since(start).Seconds())
	return nil
}

// Run keeps snapshots current until ctx ends: it listens for changes from
// every replica (PostgreSQL LISTEN/NOTIFY), rebuilds on each, resyncs
// periodically, and removes registrations whose grace period has passed.
func (s *Server) Run(ctx context.Context) error {
	go s.listen(ctx)
	reap := s.o.Clock.NewTicker(max(s.o.Grace/2, time.Second))
	defer reap.Stop()
	resync := s.o.Clock.NewTicker(s.o.Resync)
	defer resync.Stop()
	s.Kick()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		case <-resync.Chan():
		case <-reap.Chan():
			rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			if err := s.o.Store.Touch(rctx, s.o.Replica, s.servingNodes()); err != nil {
				s.o.Log.Error("xds refresh registrations", "error", err)
			}
			n, err := s.o.Store.Reap(rctx)
			cancel()
			if err != nil {
				s.o.Log.Error("xds reap registrations", "error", err)
			}
			if n == 0 {
				continue
			}
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := s.rebuild(rctx); err != nil && ctx.Err() == nil {
			s.o.Log.Error("xds rebuild", "error", err)
		}
		cancel()
	}
}

// listen turns notifications on NotifyChannel into rebuilds, reconnecting
// after errors (and rebuilding then, as notifications may have been lost).
func (s *Server) listen(ctx context.Context) {
	for ctx.Err() == nil {
		err := func() error {
			conn, err := s.o.Pool.Acquire(ctx)
			if err != nil {
				return err
			}
			defer conn.Release()
			if _, err := conn.Exec(ctx, "LISTEN "+NotifyChannel); err != nil {
				return err
			}
			defer func() {
				uctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				_, _ = conn.Exec(uctx, "UNLISTEN "+NotifyChannel)
			}()
			s.Kick()
			for {
				if _, err := conn.Conn().WaitForNotification(ctx); err != nil {
					return err
				}
				s.Kick()
			}
		}()
		if ctx.Err() != nil {
			return
		}
		s.o.Log.Warn("xds change listener", "error", err)
		select {
		case <-ctx.Done():
		case <-s.o.Clock.After(time.Second):
		}
	}
}

func (s *Server) servingNodes() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for id, ns := range s.nodes {
		if ns.node.Service != "" {
			ids = append(ids, id)
		}
	}
	return ids
}

// Nodes reports the nodes connected to this replica, sorted by id.
func (s *Server) Nodes() []NodeStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]NodeStatus, 0, len(s.nodes))
	for id, ns := range s.nodes {
		out = append(out, NodeStatus{NodeID: id, SPIFFEID: ns.node.SPIFFEID, Version: ns.version, Acked: ns.acked, LastError: ns.lastErr})
	}
	slices.SortFunc(out, func(a, b NodeStatus) int { return strings.Compare(a.NodeID, b.NodeID) })
	return out
}

// NodeMetadata builds the node metadata a bootstrap carries, for tools and
// tests that write bootstraps.
func NodeMetadata(flavor Flavor, namespace, service, address string, ports []int, labels map[string]string) (*structpb.Struct, error) {
	m := map[string]any{MetaProxy: string(flavor), MetaNamespace: namespace}
	if service != "" {
		m[MetaService], m[MetaAddress] = service, address
		ps := make([]any, len(ports))
		for i, p := range ports {
			ps[i] = float64(p)
		}
		m[MetaPorts] = ps
		ls := map[string]any{}
		for k, v := range labels {
			ls[k] = v
		}
		m[MetaLabels] = ls
	}
	return structpb.NewStruct(m)
}

// hasInbound reports whether rs holds a listener for one of n's own ports.
func hasInbound(rs Resources, n Node) bool {
	if n.Service == "" {
		return false
	}
	for _, r := range rs[resource.ListenerType] {
		name := cachev3.GetResourceName(r)
		if strings.HasPrefix(name, ServerListenerPrefix) || strings.HasPrefix(name, "inbound|") {
			return true
		}
	}
	return false
}
