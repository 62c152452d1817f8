// Package decision serves Writ's authorization decision API to
// applications that ask for decisions themselves rather than through a
// proxy: the OpenID AuthZEN Authorization API 1.0 (single and batch access
// evaluations, PDP metadata) and OPA's REST data API, so that AuthZEN
// enforcement points and OPA SDK clients work unchanged.
//
// Callers authenticate with an X.509 SVID (mutual TLS) or a JWT-SVID
// bearer token, and what each caller may ask is itself decided by Rego: the
// admin policy (data.writ.admin.allow, see policies/admin) evaluated by a
// second policy engine. Every answer is handed to an audit Sink before it is
// sent; a sink error fails closed with 503 and no decision.
//
// # Rego input of an AuthZEN evaluation
//
// The policy engine's decision path (DefaultAuthZENPath unless configured)
// is evaluated with this input, one per evaluation (batch items after the
// top-level defaults are merged in):
//
//	{
//	  "subject":  {"type": "...", "id": "...", "properties": {...}},  // as sent
//	  "resource": {"type": "...", "id": "...", "properties": {...}},  // as sent
//	  "action":   {"name": "...", "properties": {...}},               // as sent
//	  "context":  {...},                                              // as sent, {} when absent
//	  "writ": {
//	    "api": "authzen",
//	    "caller": {"spiffe_id": "...", "trust_domain": "...", "path": "...",
//	               "namespace": "...", "service_account": "...", "auth": "x509|jwt"}
//	  }
//	}
//
// properties are left out when the request has none. The decision is a
// boolean, or an object {"decision": boolean, "context": {...}} whose
// context is returned to the caller. Anything else, an undefined decision,
// an evaluation error or a timeout is a deny.
//
// # Rego input of the admin policy
//
//	{
//	  "caller": {...as above...},
//	  "api":    "authzen" | "data",
//	  "action": "evaluate" (POST) | "read" (GET of the data API),
//	  "method": "POST" | "GET",
//	  "path":   "/access/v1/evaluation" | "/access/v1/evaluations" |
//	            the data path, canonical: "envoy/authz/allow" ("" for all of data)
//	}
//
// It may import policy, authority's SPIFFE helpers and go-spiffe; writd
// and writ-enforcer mount it, nothing below imports it.
package decision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"

	"github.com/writmesh/writ/policy"
)

// DefaultAuthZENPath is the rule AuthZEN evaluations query by default.
const DefaultAuthZENPath = "data.writ.authzen.decision"

// AdminDecisionPath is the rule of the admin policy that allows a caller's
// request.
const AdminDecisionPath = "data.writ.admin.allow"

// Defaults of Options.
const (
	DefaultMaxBodyBytes   = 1 << 20
	DefaultMaxEvaluations = 256
	DefaultEvalTimeout    = 2 * time.Second
)

// APIs named in records, metrics and the admin policy's input.
const (
	APIAuthZEN = "authzen"
	APIData    = "data"
	APIBundles = "bundles"
)

// Results of a Record.
const (
	ResultAllow     = "allow"     // AuthZEN decision true
	ResultDeny      = "deny"      // AuthZEN decision false, for whatever cause
	ResultDefined   = "defined"   // data API document defined
	ResultUndefined = "undefined" // data API document undefined
	ResultError     = "error"     // data API evaluation failed: 500, no result
	ResultForbidden = "forbidden" // the admin policy refused the caller: 403
)

// Causes of a Record, a small fixed set beside the free-text Reason.
const (
	CausePolicy          = "policy"           // the policy answered
	CauseUndefined       = "undefined"        // the decision was undefined
	CausePolicyError     = "policy_error"     // evaluation failed or timed out
	CauseInvalidDecision = "invalid_decision" // the decision had the wrong shape
	CauseAdminPolicy     = "admin_policy"     // refused by the admin policy
)

// Record is the audit record of one answer: one per AuthZEN evaluation
// (each item of a batch), one per data API query, one per refused request.
// It holds a digest of the input, never the input, which may carry
// personal data.
type Record struct {
	ID   string    // UUIDv7, time-ordered
	Time time.Time // when the request arrived
	// Caller is the authenticated SPIFFE ID; Auth how: "x509" or "jwt".
	Caller, Auth string
	API          string // APIAuthZEN or APIData
	// Path is the AuthZEN endpoint path or the canonical data path.
	Path string
	// Item is the position of the evaluation in a batch, 0 otherwise.
	Item int
	// RequestID is the caller's X-Request-ID, if any.
	RequestID string
	// InputDigest is "sha256:" and the hex SHA-256 of the policy input as
	// canonical JSON (sorted keys); empty when there was no input.
	InputDigest    string
	Result         string // one of the Result constants
	Cause          string // one of the Cause constants
	Reason         string
	PolicyRevision string
	// MatchedRules name the rules that produced the answer ("FILE:LINE
	// RULE", see policy.Result.Rules), where known.
	MatchedRules []string
	Latency      time.Duration
}

// Sink receives every record before its answer is sent. An error withholds
// the answer (503): a decision that cannot be audited is not given.
type Sink interface {
	Record(ctx context.Context, r Record) error
}

// BatchSink is a Sink that also records the records of one AuthZEN batch
// in one call, all or none. Sinks without it get the records one by one,
// and a failure part way leaves the first ones recorded for a batch whose
// answer was withheld.
type BatchSink interface {
	Sink
	RecordBatch(ctx context.Context, rs []Record) error
}

// SinkFunc adapts a function to Sink.
type SinkFunc func(ctx context.Context, r Record) error

// Record calls f.
func (f SinkFunc) Record(ctx context.Context, r Record) error { return f(ctx, r) }

var _ Sink = SinkFunc(nil)

// Options configure a Server.
type Options struct {
	// Engine answers: AuthZEN evaluations query its decision path, the data
	// API any path in its policy set.
	Engine *policy.Engine
	// Admin decides whether a caller may ask (AdminDecisionPath); see
	// AdminEngineOptions.
	Admin *policy.Engine
	Sink  Sink
	// X509Bundles verify client certificates and JWTBundles bearer
	// tokens; a go-spiffe workloadapi source or a spiffebundle.Set fits.
	X509Bundles x509bundle.Source
	JWTBundles  jwtbundle.Source
	// Audience are the JWT-SVID audiences accepted (any of them).
	Audience []string
	// BaseURL is the policy decision point identifier published in the
	// AuthZEN metadata (https://host:port); empty derives it from the
	// request's Host.
	BaseURL        string
	MaxBodyBytes   int64
	MaxEvaluations int
	EvalTimeout    time.Duration
	// Bundles, if set, serves OPA bundles at GET /bundles/{name} (writd's
	// bundle service) to callers the admin policy lets read them (api
	// "bundles", action "read", path the bundle name). Callers
	// authenticate as for the other APIs, so a stock OPA pulls with a
	// client certificate (services[].credentials.client_tls).
	Bundles http.Handler
	// Metrics, if set, registers the API's metrics.
	Metrics prometheus.Registerer
	Clock   clockwork.Clock
	Logger  *slog.Logger
}

// Server is the decision API. It is an http.Handler, safe for concurrent
// use; mount it at the root of a TLS listener (see TLSConfig for one that
// accepts both client certificates and bearer tokens).
type Server struct {
	engine, admin *policy.Engine
	sink          Sink
	x509          x509bundle.Source
	jwt           jwtbundle.Source
	audience      []string
	baseURL       string
	maxBody       int64
	maxEvals      int
	timeout       time.Duration
	metrics       *metrics
	clock         clockwork.Clock
	log           *slog.Logger
	mux           *http.ServeMux
	authCache     authCache
	bundles       http.Handler
}

var _ http.Handler = (*Server)(nil)

// New checks opts and builds the API. Engine, Admin, Sink, both bundle
// sources and an audience are required: there is no unauthenticated,
// unauthorized or unaudited mode.
func New(opts Options) (*Server, error) {
	switch {
	case opts.Engine == nil:
		return nil, errors.New("decision api: no policy engine")
	case opts.Admin == nil:
		return nil, errors.New("decision api: no admin policy engine")
	case opts.Sink == nil:
		return nil, errors.New("decision api: no audit sink")
	case opts.X509Bundles == nil || opts.JWTBundles == nil:
		return nil, errors.New("decision api: no trust bundle source")
	case len(opts.Audience) == 0:
		return nil, errors.New("decision api: no JWT-SVID audience")
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if opts.MaxEvaluations <= 0 {
		opts.MaxEvaluations = DefaultMaxEvaluations
	}
	if opts.EvalTimeout <= 0 {
		opts.EvalTimeout = DefaultEvalTimeout
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	base, err := checkBaseURL(opts.BaseURL)
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(opts.Metrics)
	if err != nil {
		return nil, err
	}
	s := &Server{
		engine: opts.Engine, admin: opts.Admin, sink: opts.Sink,
		x509: opts.X509Bundles, jwt: opts.JWTBundles, audience: opts.Audience,
		baseURL: base, maxBody: opts.MaxBodyBytes, maxEvals: opts.MaxEvaluations,
		timeout: opts.EvalTimeout, metrics: m, clock: opts.Clock, log: opts.Logger,
		mux: http.NewServeMux(), bundles: opts.Bundles,
	}
	s.mux.HandleFunc("POST /access/v1/evaluation", s.serve(APIAuthZEN, s.evaluation))
	s.mux.HandleFunc("POST /access/v1/evaluations", s.serve(APIAuthZEN, s.evaluations))
	s.mux.HandleFunc("POST /access/v1/search/subject", s.serve(APIAuthZEN, s.search(searchSubject)))
	s.mux.HandleFunc("POST /access/v1/search/resource", s.serve(APIAuthZEN, s.search(searchResource)))
	s.mux.HandleFunc("POST /access/v1/search/action", s.serve(APIAuthZEN, s.search(searchAction)))
	s.mux.HandleFunc("GET /.well-known/authzen-configuration", s.metadata)
	s.mux.HandleFunc("POST /v1/data", s.serve(APIData, s.data))
	s.mux.HandleFunc("POST /v1/data/{path...}", s.serve(APIData, s.data))
	s.mux.HandleFunc("GET /v1/data", s.serve(APIData, s.data))
	s.mux.HandleFunc("GET /v1/data/{path...}", s.serve(APIData, s.data))
	if s.bundles != nil {
		s.mux.HandleFunc("GET /bundles/{name}", s.serve(APIBundles, s.bundle))
	}
	return s, nil
}

// bundle serves a bundle to a caller the admin policy lets read it.
func (s *Server) bundle(c *call) {
	name := c.r.PathValue("name")
	if !s.authorize(c, "read", name) {
		return
	}
	s.log.Debug("bundle served", "caller", c.caller.ID.String(), "bundle", name)
	s.bundles.ServeHTTP(c.w, c.r)
}

// AdminEngineOptions are the policy options of the admin engine for a
// policy directory such as policies/admin: its decision path, and smoke
// inputs of the admin input's shape.
func AdminEngineOptions(dir string) policy.Options {
	return policy.Options{Dir: dir, DecisionPath: AdminDecisionPath, SmokeInputs: adminSmokeInputs()}
}

// ServeHTTP serves the API. Every response carries nosniff and no-store.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	// ServeMux would redirect a path with "//", "." or ".." segments, and
	// clients follow a 301 by turning a POST into a GET without its body:
	// a query with input would be answered as one without. Refuse instead.
	if id := r.Header.Get("X-Request-ID"); id != "" {
		if len(id) > maxRequestIDLen || !printable(id) {
			writeJSON(w, http.StatusBadRequest, apiError{Code: codeInvalidParameter, Message: fmt.Sprintf("X-Request-ID must be at most %d printable ASCII characters", maxRequestIDLen)}, false)
			return
		}
		h.Set("X-Request-ID", id)
	}
	if p := r.URL.Path; p != cleanPath(p) {
		writeJSON(w, http.StatusBadRequest, apiError{Code: codeInvalidParameter, Message: "the URL path has empty, \".\" or \"..\" segments"}, false)
		return
	}
	s.mux.ServeHTTP(w, r)
}

// cleanPath is the canonical form ServeMux redirects to.
func cleanPath(p string) string {
	if p == "" || p[0] != '/' {
		p = "/" + p
	}
	np := path.Clean(p)
	if strings.HasSuffix(p, "/") && np != "/" {
		np += "/"
	}
	return np
}

func checkBaseURL(b string) (string, error) {
	if b == "" {
		return "", nil
	}
	u, err := parseURL(b)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || (u.Path != "" && u.Path != "/") {
		return "", fmt.Errorf("decision api: base URL %q: want https://host[:port] without path, query or fragment", b)
	}
	return "https://" + u.Host, nil
}

// HTTPServer wraps h (the API) in a server with bounded header size and
// read, write and idle timeouts, for writd and writ-enforcer alike. Serve
// it on a listener wrapped by tls.NewListener with TLSConfig (or a
// configuration that verifies client SVIDs the same way).
func HTTPServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    32 << 10,
	}
}
