// Package xdsclient configures writ-proxy's data plane from writd over
// ADS (state of the world): it connects with the workload's SVID,
// verifies writd's SPIFFE ID, sends the node identity and metadata by
// which writd registers the workload, subscribes to listeners, routes,
// clusters and endpoints, translates each consistent set into a
// proxy.Config and applies it, ACKing what it applied and NACKing, with
// the reason, what it could not. It reconnects with backoff and never
// drops the configuration in force when writd is unreachable.
//
// Secrets are not fetched: the private key stays with the local agent and
// the proxy takes SVID and trust bundle from the Workload API.
//
// It imports proxy; only cmd/writ-proxy and tests import it.
package xdsclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	// Types nested in the resources writd sends, registered so that
	// /config_dump can print them.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"

	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/proxy"
)

// typeURLs are the resource types subscribed to, all wildcard.
var typeURLs = []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType}

// MaxMessage bounds one response from writd.
const MaxMessage = 32 << 20

// Options configure a Client. Server, ServerID, Source, Node and Apply
// are required.
type Options struct {
	// Server is writd's gRPC address, host:port.
	Server string
	// ServerID is the SPIFFE ID writd must present.
	ServerID spiffeid.ID
	// Source gives the client certificate (the workload's SVID) and the
	// trust bundle that writd's certificate is checked against.
	Source proxy.Source
	// Node is sent on every stream: id and metadata (xds.NodeMetadata).
	Node  *corev3.Node
	Local Local
	// Apply puts a translated configuration in force; an error NACKs it
	// and the running configuration stays. It is called from one
	// goroutine at a time.
	Apply func(*proxy.Config) error
	// MinBackoff and MaxBackoff bound the wait between reconnects
	// (defaults 250 ms and 30 s); the wait doubles per failure, with
	// jitter, and starts over after a stream that delivered a response.
	MinBackoff, MaxBackoff time.Duration
	Clock                  clockwork.Clock
	Log                    *slog.Logger
	// Metrics, if set, receives the client's metrics.
	Metrics prometheus.Registerer
	// DialOptions are added to the gRPC dial (tests).
	DialOptions []grpc.DialOption
	// AppCheck, for a serving workload (one with inbound listeners),
	// probes its app and reports the result to writd.
	AppCheck AppCheck
}

// Client is an ADS client. It is safe for concurrent use.
type Client struct {
	o Options

	mu        sync.Mutex
	connected bool
	applied   *Snapshot
	cfg       *proxy.Config
	lastErr   string
	// appDown is the app check's verdict; appChanged wakes the reporter.
	appDown    bool
	appChanged chan struct{}
	// retry asks the stream to apply its last refused set again
	// (RetryRefused).
	retry chan struct{}

	mConnected prometheus.Gauge
	mNacks     prometheus.Counter
	mApplied   prometheus.Counter
}

// New checks o and returns a Client; Run it.
func New(o Options) (*Client, error) {
	if o.Server == "" || o.ServerID.IsZero() || o.Source == nil || o.Node.GetId() == "" || o.Apply == nil {
		return nil, errors.New("xds client: server, server id, svid source, node id and apply are required")
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 250 * time.Millisecond
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(30*time.Second, o.MinBackoff)
	}
	if o.Clock == nil {
		o.Clock = clockwork.NewRealClock()
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.AppCheck.Interval > 0 {
		if o.AppCheck.Timeout <= 0 {
			o.AppCheck.Timeout = min(o.AppCheck.Interval, time.Second)
		}
		if o.AppCheck.Threshold <= 0 {
			o.AppCheck.Threshold = 2
		}
	}
	c := &Client{
		o: o, appChanged: make(chan struct{}, 1), retry: make(chan struct{}, 1),
		mConnected: prometheus.NewGauge(prometheus.GaugeOpts{Name: "writ_proxy_xds_connected",
			Help: "1 while the ADS stream to writd is up."}),
		mNacks: prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_proxy_xds_nacks_total",
			Help: "Configurations from writd refused (NACKed)."}),
		mApplied: prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_proxy_xds_applied_total",
			Help: "Configurations from writd applied and ACKed."}),
	}
	if o.Metrics != nil {
		for _, m := range []prometheus.Collector{c.mConnected, c.mNacks, c.mApplied} {
			if err := o.Metrics.Register(m); err != nil {
				return nil, fmt.Errorf("xds client metrics: %w", err)
			}
		}
	}
	return c, nil
}

// Status is the client's state, for readiness and the admin port.
type Status struct {
	Server    string `json:"server"`
	Connected bool   `json:"connected"`
	// Version is the version of the configuration in force ("" before
	// the first).
	Version string `json:"version"`
	// LastError is why the last refused configuration was refused (the
	// NACK's reason), or why the stream last failed.
	LastError string `json:"last_error,omitempty"`
}

// Status reports the client's state.
func (c *Client) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Status{Server: c.o.Server, Connected: c.connected, LastError: c.lastErr}
	if c.applied != nil {
		s.Version = c.applied.Version
	}
	return s
}

// Dump is /config_dump: the client's status, the Envoy resources in
// force and what the proxy made of them.
func (c *Client) Dump() ([]byte, error) {
	c.mu.Lock()
	st := Status{Server: c.o.Server, Connected: c.connected, LastError: c.lastErr}
	snap, cfg := c.applied, c.cfg
	c.mu.Unlock()
	out := struct {
		XDS       Status                       `json:"xds"`
		Resources map[string][]json.RawMessage `json:"resources"`
		Proxy     *proxy.Config                `json:"proxy"`
	}{XDS: st, Resources: map[string][]json.RawMessage{}, Proxy: cfg}
	if snap != nil {
		out.XDS.Version = snap.Version
		add := func(t string, m proto.Message) error {
			b, err := protojson.Marshal(m)
			if err != nil {
				return err
			}
			out.Resources[t] = append(out.Resources[t], b)
			return nil
		}
		var errs []error
		for _, r := range snap.Listeners {
			errs = append(errs, add(resource.ListenerType, r))
		}
		for _, r := range snap.Routes {
			errs = append(errs, add(resource.RouteType, r))
		}
		for _, r := range snap.Clusters {
			errs = append(errs, add(resource.ClusterType, r))
		}
		for _, r := range snap.Endpoints {
			errs = append(errs, add(resource.EndpointType, r))
		}
		if err := errors.Join(errs...); err != nil {
			return nil, fmt.Errorf("config dump: %w", err)
		}
	}
	return json.MarshalIndent(out, "", "  ")
}

// Run keeps a stream to writd until ctx ends, reconnecting with backoff.
// The configuration in force stays while writd is unreachable.
func (c *Client) Run(ctx context.Context) error {
	if c.o.AppCheck.Interval > 0 {
		actx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { c.runAppCheck(actx); close(done) }()
		defer func() { cancel(); <-done }()
	}
	backoff := c.o.MinBackoff
	for {
		got, err := c.stream(ctx)
		c.setConnected(false)
		if ctx.Err() != nil {
			return nil
		}
		if got {
			backoff = c.o.MinBackoff
		}
		c.mu.Lock()
		c.lastErr = "stream: " + err.Error()
		c.mu.Unlock()
		// Half the backoff plus a random share of the other half: replicas
		// restarting do not get every proxy back at the same instant.
		wait := backoff/2 + rand.N(backoff/2+1)
		c.o.Log.Warn("xds stream to writd ended; keeping the configuration in force", "server", c.o.Server, "error", err, "retry_in", wait.String())
		select {
		case <-ctx.Done():
			return nil
		case <-c.o.Clock.After(wait):
		}
		backoff = min(backoff*2, c.o.MaxBackoff)
	}
}

// RetryRefused applies again, as soon as the stream is free, the last
// configuration refused whole if nothing newer has arrived since, and ACKs
// it if it now applies. writ-proxy calls it after every policy reload: a
// configuration that bound a rule the policy did not define is refused
// (fail closed), and writd will not send that version again, so without
// this the sidecar would wait for writd's next change. The ACK names the
// refused version and the nonce of the response that carried it, as a
// first answer would have; a server that has sent newer responses since
// ignores it as stale, which is right, since the newer ones are answered
// on their own.
func (c *Client) RetryRefused() {
	select {
	case c.retry <- struct{}{}:
	default:
	}
}

func (c *Client) setConnected(v bool) {
	c.mu.Lock()
	c.connected = v
	c.mu.Unlock()
	if v {
		c.mConnected.Set(1)
	} else {
		c.mConnected.Set(0)
	}
}

// response is the latest, not yet answered, response of one type.
type response struct {
	version, nonce string
	resources      []proto.Message
}

// refusedSet is the last set NACKed whole on a stream, with the nonce of
// each type's response, kept for RetryRefused until a newer response
// arrives.
type refusedSet struct {
	snap   *Snapshot
	nonces map[string]string
}

type received struct {
	r   *discoverygrpc.DiscoveryResponse
	err error
}

// stream runs one ADS stream. got reports whether writd answered at all.
func (c *Client) stream(ctx context.Context) (got bool, err error) {
	tlsCfg := svidtls.ClientConfig(c.o.Source, c.o.Source, svidtls.AuthorizeID(c.o.ServerID), c.o.Clock)
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessage)),
		// writd allows pings every 5 minutes (gRPC's default policy); a
		// dead connection is found by the kernel sooner on a live host.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 5 * time.Minute, Timeout: 20 * time.Second}),
	}, c.o.DialOptions...)
	cc, err := grpc.NewClient(c.o.Server, opts...)
	if err != nil {
		return false, fmt.Errorf("dial %s: %w", c.o.Server, err)
	}
	defer cc.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(sctx)
	if err != nil {
		return false, fmt.Errorf("open ads stream: %w", err)
	}
	// Responses are read on their own goroutine so that RetryRefused is
	// heard while the stream is idle. Each is handed over until stream
	// returns (the stream's end included, as an error); cancel then ends
	// a Recv in progress.
	recvc := make(chan received)
	stop, rdone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(rdone)
		for {
			r, err := st.Recv()
			select {
			case recvc <- received{r, err}:
			case <-stop:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	defer func() { close(stop); cancel(); <-rdone }()
	// Every type is asked for afresh (no version): writd answers with
	// everything, the client compares with what is in force, and writd
	// learns by the ACK that this node serves its configuration.
	acked := map[string]string{}
	for i, t := range typeURLs {
		req := &discoverygrpc.DiscoveryRequest{TypeUrl: t}
		if i == 0 {
			req.Node = c.o.Node
		}
		if err := st.Send(req); err != nil {
			return false, fmt.Errorf("send request: %w", err)
		}
	}
	pending := map[string]*response{}
	mismatched := 0
	refusedVer, refusals := "", 0
	// undecodable counts responses in a row that did not decode, until a
	// set applies; logged holds the type, version and error of those
	// logged since, each logged once however often the server sends it
	// again (a server that makes up versions is bounded by maxLogged).
	undecodable, logged := 0, map[string]bool{}
	var held *refusedSet
	for {
		var r *discoverygrpc.DiscoveryResponse
		select {
		case rr := <-recvc:
			if rr.err != nil {
				return got, fmt.Errorf("receive: %w", rr.err)
			}
			r = rr.r
		case <-c.retry:
			// Only a set nothing newer has overtaken: a half-received
			// newer one is decided when it completes.
			if held == nil || len(pending) > 0 || c.apply(held.snap, true) != "" {
				continue
			}
			for _, t := range typeURLs {
				acked[t] = held.snap.Version
				if err := c.answer(st, t, acked[t], held.nonces[t], ""); err != nil {
					return got, err
				}
			}
			held, refusedVer, refusals = nil, "", 0
			continue
		}
		if !got {
			got = true
			c.setConnected(true)
			c.o.Log.Info("xds stream to writd up", "server", c.o.Server)
			if c.o.AppCheck.Interval > 0 {
				// writd has joined the node by now: it takes reports for it.
				hdone := make(chan struct{})
				go func() { c.reportHealth(sctx, cc); close(hdone) }()
				defer func() { cancel(); <-hdone }()
			}
		}
		t := r.GetTypeUrl()
		if !isType(t) {
			// Not asked for; answer so writd does not wait on it.
			if err := c.answer(st, t, "", r.GetNonce(), "type not subscribed"); err != nil {
				return got, err
			}
			continue
		}
		// A newer response makes the held set's nonce for this type stale.
		held = nil
		res, derr := decode(t, r)
		if derr != nil {
			// A server may send the same broken response again on every
			// NACK (go-control-plane's plain cache does): after the first,
			// answer after the growing pause a refused set takes, so that
			// such a server cannot keep the proxy in a tight NACK loop. The
			// count goes on across versions, since a server that bumps the
			// version of a broken resource loops just as well.
			undecodable++
			if undecodable > 1 {
				select {
				case <-ctx.Done():
					return got, ctx.Err()
				case <-c.o.Clock.After(c.refusedPause(undecodable - 1)):
				}
			}
			key := t + "\x00" + r.GetVersionInfo() + "\x00" + derr.Error()
			if len(logged) >= maxLogged {
				clear(logged)
			}
			c.undecodable(t, r.GetVersionInfo(), derr, !logged[key])
			logged[key] = true
			if err := c.answer(st, t, c.nackVersion(acked, t), r.GetNonce(), derr.Error()); err != nil {
				return got, err
			}
			delete(pending, t)
			continue
		}
		pending[t] = &response{version: r.GetVersionInfo(), nonce: r.GetNonce(), resources: res}
		if len(pending) < len(typeURLs) {
			continue
		}
		version, ok := consistent(pending)
		if !ok && mismatched < maxMismatched {
			// Every type has its one outstanding response, but the server
			// changed its configuration between them: nothing more will
			// come until they are answered. Ask again for all of them
			// without accepting (the version stays the one in force) to
			// get one consistent set.
			mismatched++
			for _, t := range typeURLs {
				if err := c.answer(st, t, acked[t], pending[t].nonce, ""); err != nil {
					return got, err
				}
			}
			clear(pending)
			continue
		}
		// A server that versions types apart never agrees: take the set
		// as it is, named by the listeners' version.
		mismatched = 0
		snap := snapshot(version, pending)
		reason := c.apply(snap, false)
		if reason == "" {
			refusedVer, refusals = "", 0
			undecodable = 0
			clear(logged)
		} else if version == refusedVer {
			// The server sends again what was refused (writd does not; a
			// plain snapshot cache does on every NACK): answer after a
			// growing pause rather than in a tight loop, or at once if a
			// policy reload lets it apply.
			refusals++
			select {
			case <-ctx.Done():
				return got, ctx.Err()
			case <-c.o.Clock.After(c.refusedPause(refusals)):
			case <-c.retry:
				if c.apply(snap, true) == "" {
					reason, refusedVer, refusals = "", "", 0
				}
			}
		} else {
			refusedVer, refusals = version, 0
		}
		for _, t := range typeURLs {
			p := pending[t]
			v := acked[t]
			if reason == "" {
				acked[t], v = p.version, p.version
			} else {
				v = c.nackVersion(acked, t)
			}
			if err := c.answer(st, t, v, p.nonce, reason); err != nil {
				return got, err
			}
		}
		if reason != "" {
			held = &refusedSet{snap: snap, nonces: map[string]string{}}
			for _, t := range typeURLs {
				held.nonces[t] = pending[t].nonce
			}
		}
		clear(pending)
	}
}

// refusedPause is the wait before answering the nth repeat of a refused
// response: MinBackoff, doubling per repeat up to MaxBackoff.
func (c *Client) refusedPause(n int) time.Duration {
	return min(c.o.MinBackoff<<min(n-1, 16), c.o.MaxBackoff)
}

// nackVersion is the version a NACK of type t names: the last one ACKed
// on this stream or, before any, the one in force, as Envoy's NACKs do.
// On a new stream that matters: writd puts its last good snapshot back,
// and a node that says it runs that version is sent nothing more, so the
// refused set stays held for RetryRefused; a NACK naming no version would
// have the last good one sent, and that newer response would drop the
// held set.
func (c *Client) nackVersion(acked map[string]string, t string) string {
	if v := acked[t]; v != "" {
		return v
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.applied == nil {
		return ""
	}
	return c.applied.Version
}

// maxLogged bounds the undecodable responses remembered as logged.
const maxLogged = 64

// maxMismatched bounds how often in a row a set whose types disagree on
// the version is asked for again.
const maxMismatched = 3

// consistent reports whether every type is at one version (writd
// versions a node's resources together), so that a set is applied whole
// and a route never points at a cluster not yet received. Otherwise it
// returns the listeners' version.
func consistent(pending map[string]*response) (string, bool) {
	v := pending[typeURLs[0]].version
	for _, p := range pending {
		if p.version != v {
			return v, false
		}
	}
	return v, true
}

func isType(t string) bool {
	for _, x := range typeURLs {
		if x == t {
			return true
		}
	}
	return false
}

// apply translates and applies snap, returning the NACK reason or "".
// retry is a refused set tried again (RetryRefused): it was NACKed
// already, so failing again is logged, not counted as a NACK.
func (c *Client) apply(snap *Snapshot, retry bool) string {
	cfg, err := Translate(snap, c.o.Local)
	if err == nil {
		c.mu.Lock()
		same := c.cfg != nil && reflect.DeepEqual(cfg, c.cfg)
		c.mu.Unlock()
		// An identical configuration is not applied again: Update would
		// start endpoints' outlier and health state afresh.
		if !same {
			err = c.o.Apply(cfg)
		}
	}
	if err != nil && retry {
		c.mu.Lock()
		c.lastErr = fmt.Sprintf("version %s refused: %v", snap.Version, err)
		c.mu.Unlock()
		c.o.Log.Info("xds configuration refused before still cannot be applied", "version", snap.Version, "error", err)
		return err.Error()
	}
	if err != nil {
		c.refused(snap.Version, err)
		return err.Error()
	}
	c.mu.Lock()
	c.applied, c.cfg, c.lastErr = snap, cfg, ""
	c.mu.Unlock()
	// The reporter names the inbound listeners in force.
	select {
	case c.appChanged <- struct{}{}:
	default:
	}
	c.mApplied.Inc()
	c.o.Log.Info("xds configuration applied", "version", snap.Version, "listeners", len(snap.Listeners), "routes", len(snap.Routes), "clusters", len(snap.Clusters))
	return ""
}

func (c *Client) refused(version string, err error) {
	c.mu.Lock()
	c.lastErr = fmt.Sprintf("version %s refused: %v", version, err)
	c.mu.Unlock()
	c.mNacks.Inc()
	c.o.Log.Error("xds configuration refused (NACK); keeping the one in force", "version", version, "error", err)
}

// undecodable records a response of type t that did not decode, logging
// it only if log (the stream has not logged that type, version and error
// since a set last applied): a server that sends it again on every NACK
// would otherwise fill the log.
func (c *Client) undecodable(t, version string, err error, log bool) {
	c.mu.Lock()
	c.lastErr = fmt.Sprintf("version %s refused: %v", version, err)
	c.mu.Unlock()
	c.mNacks.Inc()
	if log {
		c.o.Log.Error("xds response undecodable (NACK); keeping the configuration in force", "type", t, "version", version, "error", err)
	}
}

// answer ACKs (reason "") or NACKs one response. version is the last
// version of the type in force.
func (c *Client) answer(st discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient, t, version, nonce, reason string) error {
	req := &discoverygrpc.DiscoveryRequest{TypeUrl: t, VersionInfo: version, ResponseNonce: nonce}
	if reason != "" {
		req.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: reason}
	}
	if err := st.Send(req); err != nil {
		return fmt.Errorf("send ack: %w", err)
	}
	return nil
}

func decode(t string, r *discoverygrpc.DiscoveryResponse) ([]proto.Message, error) {
	var out []proto.Message
	for i, a := range r.GetResources() {
		if a.GetTypeUrl() != t {
			return nil, fmt.Errorf("resource %d: type %s in a %s response", i, a.GetTypeUrl(), t)
		}
		var m proto.Message
		switch t {
		case resource.ListenerType:
			m = &listenerv3.Listener{}
		case resource.RouteType:
			m = &routev3.RouteConfiguration{}
		case resource.ClusterType:
			m = &clusterv3.Cluster{}
		case resource.EndpointType:
			m = &endpointv3.ClusterLoadAssignment{}
		}
		if err := a.UnmarshalTo(m); err != nil {
			return nil, fmt.Errorf("resource %d: %w", i, err)
		}
		out = append(out, m)
	}
	return out, nil
}

func snapshot(version string, pending map[string]*response) *Snapshot {
	s := &Snapshot{Version: version}
	for _, m := range pending[resource.ListenerType].resources {
		s.Listeners = append(s.Listeners, m.(*listenerv3.Listener))
	}
	for _, m := range pending[resource.RouteType].resources {
		s.Routes = append(s.Routes, m.(*routev3.RouteConfiguration))
	}
	for _, m := range pending[resource.ClusterType].resources {
		s.Clusters = append(s.Clusters, m.(*clusterv3.Cluster))
	}
	for _, m := range pending[resource.EndpointType].resources {
		s.Endpoints = append(s.Endpoints, m.(*endpointv3.ClusterLoadAssignment))
	}
	return s
}
