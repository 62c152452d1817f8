package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/writmesh/writ/authority/nodeapi"
	"github.com/writmesh/writ/authority/selector"
)

// Bounds on Workload API input; every value comes from an unauthenticated
// local process.
const (
	maxAudiences    = 16
	maxAudienceLen  = 256
	maxTokenLen     = 16 << 10
	maxRecvMsgSize  = 64 << 10
	maxStreamsPerCn = 32
	maxJWTCache     = 4096
)

// connReadBuffer is the read buffer of each of the agent's gRPC
// connections (the Workload API's, and its own to writd), instead of
// gRPC's 32 KiB. A buffer is held for the connection's life, and every
// workload on the node keeps a Workload API connection open; the
// messages are small and a few a minute, so a smaller buffer costs at
// most a few more reads of a large one.
const connReadBuffer = 4 << 10

// ListenUnix parses a Workload API address ("unix:///run/writ/agent.sock"),
// creates the socket's directory if missing (0755), replaces a stale
// socket, and listens with mode 0777: any local user may connect, because
// the agent authenticates callers by attestation, not file permissions.
func ListenUnix(addr string) (net.Listener, string, error) {
	u, err := url.Parse(addr)
	if err != nil {
		return nil, "", fmt.Errorf("workload api address %q: %w", addr, err)
	}
	if u.Scheme != "unix" || u.Host != "" || u.Path == "" || u.RawQuery != "" || u.Fragment != "" {
		return nil, "", fmt.Errorf("workload api address %q: want unix:///absolute/path.sock", addr)
	}
	path := filepath.Clean(u.Path)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, "", fmt.Errorf("create workload api directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, "", fmt.Errorf("workload api path %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, "", fmt.Errorf("remove stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, "", fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o777); err != nil {
		l.Close()
		return nil, "", fmt.Errorf("chmod workload api socket: %w", err)
	}
	return l, path, nil
}

// Serve runs the SPIFFE Workload API on l, at most Config.MaxConns
// connections at a time, until ctx ends. It then stops the server outright:
// Workload API streams never end by themselves, so waiting for them would
// only delay shutdown; clients reconnect to the next agent.
func (a *Agent) Serve(ctx context.Context, l net.Listener) error {
	l = limitListener(l, a.cfg.MaxConns)
	srv := a.NewWorkloadServer()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case <-ctx.Done():
		srv.Stop()
		<-errc
		return nil
	case err := <-errc:
		return fmt.Errorf("workload api: %w", err)
	}
}

// NewWorkloadServer returns a grpc server with the Workload API registered,
// the security header enforced and messages bounded, for a unix socket
// listener (it attests callers by their peer credentials). Serve uses it;
// it is exported for callers that manage their own listener.
func (a *Agent) NewWorkloadServer() *grpc.Server {
	srv := grpc.NewServer(
		grpc.Creds(PeerCredentials()),
		grpc.MaxRecvMsgSize(maxRecvMsgSize),
		grpc.MaxConcurrentStreams(maxStreamsPerCn),
		grpc.ReadBufferSize(connReadBuffer),
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := checkHeader(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := checkHeader(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	)
	workload.RegisterSpiffeWorkloadAPIServer(srv, &workloadServer{a: a})
	return srv
}

// checkHeader enforces the Workload API's security header, which keeps a
// browser or SSRF-style proxy from reaching the socket on a workload's
// behalf.
func checkHeader(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request: want metadata workload.spiffe.io: true")
	}
	return nil
}

type workloadServer struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	a *Agent
}

// caller attests the peer of ctx.
func (a *Agent) caller(ctx context.Context) (selector.Set, *PeerInfo, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, nil, status.Error(codes.Internal, "no peer information")
	}
	info, ok := p.AuthInfo.(*PeerInfo)
	if !ok {
		return nil, nil, status.Error(codes.PermissionDenied, "caller could not be attested: not connected over the agent's unix socket")
	}
	sels, errs := info.Selectors()
	for _, err := range errs {
		a.log.Debug("partial workload attestation", logPID, info.PID, logUID, info.UID, logError, err)
	}
	return sels, info, nil
}

// matching returns the entries whose selectors the caller has, sorted by
// entry id so that responses are stable. Callers hold a.mu.
func (a *Agent) matchingLocked(sels selector.Set) []*entry {
	var out []*entry
	for _, e := range a.entries {
		if sels.Matches(e.selectors) {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(x, y *entry) int { return strings.Compare(x.id, y.id) })
	return out
}

var errNotReady = status.Error(codes.Unavailable, "agent not ready: it has not synced with the control plane yet")

func errNoIdentity(info *PeerInfo) error {
	return status.Errorf(codes.PermissionDenied, "no identity issued: no registration entry matches this workload (uid %d, gid %d)", info.UID, info.GID)
}

// x509Snapshot is the X.509 response for a caller and the channel that
// closes when it may have changed.
func (a *Agent) x509Snapshot(sels selector.Set) (resp *workload.X509SVIDResponse, matched, lapsed int, synced bool, changed <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	synced = a.synced
	now := a.clk.Now()
	var roots bytes.Buffer
	for _, c := range a.bundle.X509Authorities() {
		roots.Write(c.Raw)
	}
	resp = &workload.X509SVIDResponse{}
	for _, e := range a.matchingLocked(sels) {
		matched++
		if e.lapsed {
			lapsed++
		}
		if e.svid == nil || !now.Before(e.svid.Certificates[0].NotAfter) {
			continue
		}
		var chain bytes.Buffer
		for _, c := range e.svid.Certificates {
			chain.Write(c.Raw)
		}
		resp.Svids = append(resp.Svids, &workload.X509SVID{
			SpiffeId:    e.spiffeID.String(),
			X509Svid:    chain.Bytes(),
			X509SvidKey: e.keyDER,
			Bundle:      roots.Bytes(),
		})
	}
	return resp, matched, lapsed, synced, a.changed
}

func (s *workloadServer) FetchX509SVID(_ *workload.X509SVIDRequest, stream workload.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	ctx := stream.Context()
	var last [32]byte
	sent := false
	for {
		// Attest again before every push: the caller may have exec(2)d
		// another binary, or exited and left the socket to a child,
		// since the stream began.
		sels, info, err := s.a.caller(ctx)
		if err != nil {
			return err
		}
		resp, matched, lapsed, synced, changed := s.a.x509Snapshot(sels)
		switch {
		case !synced:
			// The agent has not heard from writd yet: wait, do not
			// refuse an identity that may well exist.
		case len(resp.Svids) > 0:
			sum := digestX509(resp)
			if !sent || sum != last {
				if err := stream.Send(resp); err != nil {
					return err
				}
				sent, last = true, sum
			}
		case lapsed > 0:
			return status.Error(codes.Unavailable, "SVIDs expired before the control plane could renew them")
		case matched > 0:
			// Entries match but no SVID is signed yet (just added, maybe
			// replacing one that was removed): wait for one rather than
			// refuse.
		default:
			return errNoIdentity(info)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

func digestX509(resp *workload.X509SVIDResponse) [32]byte {
	h := sha256.New()
	for _, s := range resp.Svids {
		h.Write([]byte(s.SpiffeId))
		h.Write([]byte{0})
		h.Write(s.X509Svid)
		h.Write(s.Bundle)
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// mayVerify reports whether the caller may see bundles: it has an entry,
// or unauthenticated verifiers are allowed.
func (a *Agent) mayVerify(sels selector.Set, info *PeerInfo) error {
	if a.cfg.AllowUnauthenticatedVerifiers {
		return nil
	}
	a.mu.Lock()
	n, synced := len(a.matchingLocked(sels)), a.synced
	a.mu.Unlock()
	if !synced {
		return errNotReady
	}
	if n == 0 {
		return errNoIdentity(info)
	}
	return nil
}

func (a *Agent) bundleSnapshot() (td string, x509DER []byte, jwks []byte, changed <-chan struct{}, err error) {
	a.mu.Lock()
	b, ch := a.bundle, a.changed
	a.mu.Unlock()
	var roots bytes.Buffer
	for _, c := range b.X509Authorities() {
		roots.Write(c.Raw)
	}
	jwks, err = b.JWTBundle().Marshal()
	if err != nil {
		return "", nil, nil, nil, status.Errorf(codes.Internal, "marshal JWT bundle: %v", err)
	}
	return b.TrustDomain().IDString(), roots.Bytes(), jwks, ch, nil
}

func (s *workloadServer) FetchX509Bundles(_ *workload.X509BundlesRequest, stream workload.SpiffeWorkloadAPI_FetchX509BundlesServer) error {
	return s.streamBundles(stream.Context(), func(roots, _ []byte) []byte { return roots }, func(td string, b []byte) error {
		return stream.Send(&workload.X509BundlesResponse{Bundles: map[string][]byte{td: b}})
	})
}

func (s *workloadServer) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream workload.SpiffeWorkloadAPI_FetchJWTBundlesServer) error {
	return s.streamBundles(stream.Context(), func(_, jwks []byte) []byte { return jwks }, func(td string, b []byte) error {
		return stream.Send(&workload.JWTBundlesResponse{Bundles: map[string][]byte{td: b}})
	})
}

// streamBundles sends one form of the bundle (pick chooses X.509 roots or
// JWKS) now and again whenever it changes, re-attesting the caller before
// every send.
func (s *workloadServer) streamBundles(ctx context.Context, pick func(roots, jwks []byte) []byte, send func(td string, b []byte) error) error {
	sels, info, err := s.a.caller(ctx)
	if err != nil {
		return err
	}
	var last []byte
	for {
		if err := s.a.mayVerify(sels, info); err != nil {
			return err
		}
		td, roots, jwks, changed, err := s.a.bundleSnapshot()
		if err != nil {
			return err
		}
		if b := pick(roots, jwks); last == nil || !bytes.Equal(last, b) {
			if err := send(td, b); err != nil {
				return err
			}
			last = b
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

func validateAudience(aud []string) error {
	if len(aud) == 0 {
		return status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if len(aud) > maxAudiences {
		return status.Errorf(codes.InvalidArgument, "at most %d audiences are allowed", maxAudiences)
	}
	for _, s := range aud {
		if s == "" || len(s) > maxAudienceLen {
			return status.Errorf(codes.InvalidArgument, "each audience must be 1 to %d bytes", maxAudienceLen)
		}
	}
	return nil
}

func (s *workloadServer) FetchJWTSVID(ctx context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := validateAudience(req.GetAudience()); err != nil {
		return nil, err
	}
	var want spiffeid.ID
	if req.GetSpiffeId() != "" {
		id, err := spiffeid.FromString(req.GetSpiffeId())
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "spiffe_id %q is not a SPIFFE ID: %v", req.GetSpiffeId(), err)
		}
		want = id
	}
	sels, info, err := s.a.caller(ctx)
	if err != nil {
		return nil, err
	}
	s.a.mu.Lock()
	if !s.a.synced {
		s.a.mu.Unlock()
		return nil, errNotReady
	}
	var targets []*entry
	for _, e := range s.a.matchingLocked(sels) {
		if want.IsZero() || e.spiffeID == want {
			targets = append(targets, &entry{id: e.id, spiffeID: e.spiffeID})
		}
	}
	s.a.mu.Unlock()
	if len(targets) == 0 {
		if !want.IsZero() {
			return nil, status.Errorf(codes.PermissionDenied, "no identity issued: this workload is not entitled to %s", want)
		}
		return nil, errNoIdentity(info)
	}
	resp := &workload.JWTSVIDResponse{}
	for _, e := range targets {
		tok, err := s.a.jwtFor(ctx, e, req.GetAudience())
		if err != nil {
			return nil, err
		}
		resp.Svids = append(resp.Svids, &workload.JWTSVID{SpiffeId: e.spiffeID.String(), Svid: tok})
	}
	return resp, nil
}

// jwtFor returns a JWT-SVID for e and aud: a cached one until half its
// life, else a fresh one from writd, else (writd unreachable) a cached one
// that has not expired.
func (a *Agent) jwtFor(ctx context.Context, e *entry, aud []string) (string, error) {
	key := jwtKey(e.id, aud)
	now := a.clk.Now()
	a.mu.Lock()
	cached, ok := a.jwts.m[key]
	a.mu.Unlock()
	if ok && now.Before(cached.renewAt) {
		return cached.token, nil
	}
	a.mu.Lock()
	allowed := a.mintLimit.AllowN(now, 1)
	a.mu.Unlock()
	if !allowed {
		if ok && now.Before(cached.expiresAt) {
			return cached.token, nil
		}
		return "", status.Error(codes.ResourceExhausted, "too many new JWT-SVID requests on this node; retry later")
	}
	tok, exp, err := a.mintJWT(ctx, e, aud)
	if err != nil {
		switch status.Code(errors.Unwrap(err)) {
		case codes.PermissionDenied, codes.NotFound:
			// writd no longer has this entry for us; the next sync
			// drops it here too. A cached token is not served.
			a.mu.Lock()
			a.jwts.dropEntry(e.id)
			a.mu.Unlock()
			a.log.Warn("control plane refused a JWT-SVID", logEntryID, e.id, logError, err)
			return "", status.Errorf(codes.PermissionDenied, "no identity issued: %s is no longer registered for this node", e.spiffeID)
		}
		if ok && now.Before(cached.expiresAt) {
			a.log.Warn("mint JWT-SVID failed; serving the cached one", logEntryID, e.id, logError, err)
			return cached.token, nil
		}
		a.log.Warn("mint JWT-SVID failed", logEntryID, e.id, logError, err)
		return "", status.Errorf(codes.Unavailable, "could not mint a JWT-SVID for %s: control plane unavailable", e.spiffeID)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, still := a.entries[e.id]; still {
		a.jwts.put(key, cachedJWT{entryID: e.id, token: tok, expiresAt: exp, renewAt: now.Add(exp.Sub(now) / 2)}, now)
	}
	return tok, nil
}

func (a *Agent) mintJWT(ctx context.Context, e *entry, aud []string) (string, time.Time, error) {
	c, err := a.client()
	if err != nil {
		return "", time.Time{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RPCTimeout)
	defer cancel()
	resp, err := c.MintJWTSVID(ctx, &nodeapi.MintJWTSVIDRequest{EntryId: e.id, Audience: aud})
	if err != nil {
		a.noteErr(err)
		return "", time.Time{}, fmt.Errorf("mint JWT-SVID: %w", err)
	}
	// Check what writd gave us before handing it out: signed by our
	// trust domain, for the entry's ID and the asked audience.
	svid, err := jwtsvid.ParseAndValidate(resp.GetToken(), jwtBundleSource{a}, aud)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("mint JWT-SVID: invalid token from control plane: %w", err)
	}
	if svid.ID != e.spiffeID {
		return "", time.Time{}, fmt.Errorf("mint JWT-SVID: token is for %q, want %q", svid.ID, e.spiffeID)
	}
	return resp.GetToken(), svid.Expiry, nil
}

type jwtBundleSource struct{ a *Agent }

func (s jwtBundleSource) GetJWTBundleForTrustDomain(td spiffeid.TrustDomain) (*jwtbundle.Bundle, error) {
	b := s.a.currentBundle()
	if td != b.TrustDomain() {
		return nil, fmt.Errorf("no bundle for trust domain %q", td)
	}
	return b.JWTBundle(), nil
}

func (s *workloadServer) ValidateJWTSVID(ctx context.Context, req *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	if req.GetAudience() == "" {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if req.GetSvid() == "" {
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	if len(req.GetSvid()) > maxTokenLen {
		return nil, status.Errorf(codes.InvalidArgument, "svid longer than %d bytes", maxTokenLen)
	}
	sels, info, err := s.a.caller(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.a.mayVerify(sels, info); err != nil {
		return nil, err
	}
	svid, err := jwtsvid.ParseAndValidate(req.GetSvid(), jwtBundleSource{s.a}, []string{req.GetAudience()})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "invalid JWT-SVID: %v", err)
	}
	claims, err := structpb.NewStruct(svid.Claims)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode claims: %v", err)
	}
	return &workload.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// --- JWT cache -------------------------------------------------------------

type cachedJWT struct {
	entryID   string
	token     string
	expiresAt time.Time
	renewAt   time.Time
}

// jwtCache is guarded by Agent.mu.
type jwtCache struct {
	m map[string]cachedJWT
}

func jwtKey(entryID string, aud []string) string {
	sorted := slices.Clone(aud)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	return entryID + "\x00" + strings.Join(sorted, "\x00")
}

// put stores a token, first evicting expired ones and, if still full,
// everything: the cache saves writd work, it is not a source of truth.
func (c *jwtCache) put(key string, v cachedJWT, now time.Time) {
	if len(c.m) >= maxJWTCache {
		for k, old := range c.m {
			if !now.Before(old.expiresAt) {
				delete(c.m, k)
			}
		}
		if len(c.m) >= maxJWTCache {
			clear(c.m)
		}
	}
	c.m[key] = v
}

func (c *jwtCache) dropEntry(id string) {
	for k, v := range c.m {
		if v.entryID == id {
			delete(c.m, k)
		}
	}
}

// limitListener bounds open connections like x/net/netutil's, but its
// connections still expose SyscallConn, which peer attestation needs.
func limitListener(l net.Listener, n int) net.Listener {
	return &limitedListener{Listener: l, sem: make(chan struct{}, n)}
}

type limitedListener struct {
	net.Listener
	sem chan struct{}
}

func (l *limitedListener) Accept() (net.Conn, error) {
	l.sem <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		<-l.sem
		c.Close()
		return nil, fmt.Errorf("workload api: unexpected connection type %T", c)
	}
	return &limitedConn{UnixConn: uc, release: func() { <-l.sem }}, nil
}

type limitedConn struct {
	*net.UnixConn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.UnixConn.Close()
	c.once.Do(c.release)
	return err
}
