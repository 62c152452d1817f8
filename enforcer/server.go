package enforcer

import (
	"cmp"
	"context"
	"runtime"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Limits of the ext_authz gRPC service. A CheckRequest carries headers and
// at most a buffered body; 4 MiB is far above what Envoy sends with
// with_request_body limits and bounds a hostile client.
const (
	MaxCheckMessageBytes = 4 << 20
	DefaultCheckTimeout  = 2 * time.Second
)

// Server serves Envoy's ext_authz v3 Authorization service from an
// Enforcer. Transport security (mTLS with SVIDs) is the caller's: pass it
// in the grpc.ServerOptions. Safe for concurrent use.
type Server struct {
	authv3.UnimplementedAuthorizationServer
	enforcer *Enforcer
	binder   *Binder
	timeout  time.Duration
	health   *health.Server
}

var _ authv3.AuthorizationServer = (*Server)(nil)

// NewServer wraps e. Each Check is bounded by timeout (DefaultCheckTimeout
// if zero), whatever deadline the client set.
func NewServer(e *Enforcer, timeout time.Duration) *Server {
	if timeout <= 0 {
		timeout = DefaultCheckTimeout
	}
	return &Server{enforcer: e, timeout: timeout, health: health.NewServer()}
}

// WithBinder makes s honour the writ.authz_decision context extension
// that writd puts on the inbound routes of services bound by
// AuthorizationPolicies: a request naming other queries than the
// enforcer's own, or dry-run ones (writ.authz_dry_run), is decided by
// b's enforcer for them (every enforced one must allow). Without a binder, or when b cannot make that enforcer, such a
// request is denied. Call before serving.
func (s *Server) WithBinder(b *Binder) *Server {
	s.binder = b
	return s
}

// ServerOptions are the message bounds every ext_authz server should use,
// to append to the caller's credentials option. Streams are served by a
// fixed pool of workers: a goroutine per check would grow a fresh stack
// for every request, which costs more than the policy. grpc-go hands a
// stream to a worker only if one is already waiting, else starts a
// goroutine; with workers for 4 per CPU, under load (checks waiting on the
// audit write or for a CPU) most streams found none and the profile showed
// stack growth. The pool covers the concurrency Envoy sends instead; an
// idle worker costs only its stack. CheckRequests are decoded by Codec.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxCheckMessageBytes),
		grpc.MaxSendMsgSize(MaxCheckMessageBytes),
		grpc.MaxConcurrentStreams(1024),
		grpc.NumStreamWorkers(uint32(max(64, runtime.GOMAXPROCS(0)*16))),
		grpc.SharedWriteBuffer(true),
		grpc.ForceServerCodecV2(Codec()),
	}
}

// Register adds the Authorization service and grpc.health.v1 (reporting
// SERVING for the overall server and the ext_authz service) to g.
func (s *Server) Register(g *grpc.Server) {
	authv3.RegisterAuthorizationServer(g, s)
	healthpb.RegisterHealthServer(g, s.health)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(authv3.Authorization_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
}

// Shutdown marks the server NOT_SERVING so that health-checking clients
// move away before the listener closes.
func (s *Server) Shutdown() { s.health.Shutdown() }

// Check answers one ext_authz request. It never returns an error: a request
// that cannot be decided gets a denial, as Check documents, so Envoy's
// failure_mode_allow never comes into play.
func (s *Server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	// Envoy sends a deadline with every check (its ext_authz timeout,
	// 200ms by default); a context and a timer of our own only when the
	// client's is later or absent.
	if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > s.timeout {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	e := s.enforcer
	ext := req.GetAttributes().GetContextExtensions()
	v, dry := cmp.Or(ext[DecisionContextKey], e.DecisionPath()), ext[DryRunContextKey]
	if v != e.DecisionPath() || dry != "" {
		if s.binder == nil {
			resp, _ := e.CheckUnbound(ctx, req, "bound policy decisions "+v+" (dry run: "+dry+"): this enforcer decides by "+e.DecisionPath()+" only")
			return resp, nil
		}
		be, err := s.binder.For(ctx, v, dry)
		if err != nil {
			resp, _ := e.CheckUnbound(ctx, req, "bound policy decision: "+err.Error())
			return resp, nil
		}
		e = be
	}
	resp, _ := e.Check(ctx, req)
	return resp, nil
}
