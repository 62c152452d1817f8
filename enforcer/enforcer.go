// Package enforcer turns an Envoy ext_authz CheckRequest into a policy
// input, asks the policy engine, maps the decision onto a CheckResponse and
// hands a record of every decision to an audit sink before answering.
// writ-proxy calls Check in-process; writ-enforcer serves the same Check
// to Envoy over gRPC.
//
// It imports policy; proxy, the enforcer server and the API import it.
package enforcer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/uuid"
	"github.com/jonboulle/clockwork"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/writmesh/writ/policy"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// Result values of a Decision.
const (
	ResultAllow = "allow"
	ResultDeny  = "deny"
)

// Causes of a Decision: a small fixed set, fit for metric labels and audit
// queries, beside the free-text Reason.
const (
	CausePolicy          = "policy"           // the policy answered
	CauseBadPath         = "bad_path"         // refused before policy: 400
	CauseInputError      = "input_error"      // the request could not be turned into input
	CausePolicyError     = "policy_error"     // evaluation failed
	CauseUndefined       = "undefined"        // the decision was undefined
	CauseInvalidDecision = "invalid_decision" // the decision had the wrong shape
	CauseAuditSink       = "audit_sink"       // the sink refused the record
	CauseDryRunMode      = "dry_run_mode"     // the policy denied, in dry-run mode: allowed
)

// Decision is the record of one authorization decision, handed to the
// audit sink. Its fields are plain values so that sinks can serialize it
// as they like.
type Decision struct {
	ID   string    // UUIDv7, time-ordered
	Time time.Time // when the request reached the enforcer
	// Source and Destination are the peers' principals (SPIFFE IDs under
	// mTLS), empty when Envoy reported none.
	Source, Destination string
	Method              string
	// Path is what the policy saw; RawPath is what the client sent.
	Path, RawPath string
	Protocol      string // as Envoy reported it: HTTP/1.1, HTTP/2, ...
	GRPC          bool
	Result        string // ResultAllow or ResultDeny
	// HTTPStatus is 200 for an allow, else the status sent to the client.
	HTTPStatus int
	// Reason says why: the policy's answer or why there was none.
	Reason         string
	Cause          string // one of the Cause constants
	PolicyRevision string
	Cached         bool // the policy answer came from the decision cache
	Latency        time.Duration
	TraceID        string // from the W3C traceparent header, if any
	// Host is the request's host (:authority).
	Host string
	// Headers are the request's headers as received (the request's own
	// map, not a copy). Sinks keep only an allowlisted subset
	// (audit.Redaction) and never log them whole: they carry credentials.
	Headers map[string]string
	// DryRun is the candidate policy's answer, when one is configured and
	// the request reached policy (nil for a 400). It is recorded, never
	// enforced. In dry-run mode (ModeContextKey) a denial of the policy
	// itself goes here instead, Result being allow.
	DryRun *DryRun
	// MatchedRules name the rules of the decision path that produced the
	// policy's answer, as "FILE:LINE RULE" (policy.Result.Rules): the
	// allow rule that held, or the default. Empty when no rule answered
	// or the engine could not tell. Shared: read-only.
	MatchedRules []string
	// MTLS is true when the caller presented a verified client
	// certificate (the request's source has a principal or certificate).
	MTLS bool
	// PeerCertNotAfter is the caller's certificate's expiry when the
	// request carried the certificate (attributes.source.certificate),
	// else zero.
	PeerCertNotAfter time.Time
}

// DryRun is what a candidate policy would have decided.
type DryRun struct {
	Result         string
	HTTPStatus     int
	Reason         string
	PolicyRevision string
	MatchedRules   []string
	// Disagrees is true when the candidate's result or status differs from
	// the enforced decision.
	Disagrees bool
}

// Sink receives every decision before its response is returned. An error
// turns the decision into a deny: a decision that cannot be audited is not
// enforced as an allow.
type Sink interface {
	Record(ctx context.Context, d Decision) error
}

// SinkFunc adapts a function to Sink.
type SinkFunc func(ctx context.Context, d Decision) error

// Record calls f.
func (f SinkFunc) Record(ctx context.Context, d Decision) error { return f(ctx, d) }

var _ Sink = SinkFunc(nil)

// Options configure an Enforcer.
type Options struct {
	Engine *policy.Engine
	// Also are engines over the same policies with other decision paths
	// that every request must pass too: an allow needs every decision to
	// allow, and the first (Engine's, then Also's in order) that denies,
	// errs or is undefined decides the denial. This is how several
	// AuthorizationPolicies enforced on one service combine (Binder).
	Also []*policy.Engine
	// Candidate, if set, is evaluated beside Engine on every request (dry
	// run); its answers go into Decision.DryRun and never into responses.
	Candidate *policy.Engine
	// CandidateAlso are further dry-run engines over the same policies:
	// the dry-run verdict is an allow only if Candidate and every one of
	// them allow, as with Also. This is how dry-run AuthorizationPolicies
	// beside enforced ones are evaluated (Binder).
	CandidateAlso []*policy.Engine
	// CandidateErr, if set without Candidate, is why the dry-run policies
	// bound to the service cannot be evaluated: every decision records it
	// as the dry-run deny, and enforcement goes on unchanged.
	CandidateErr error
	Sink         Sink
	// MaxBodyBytes bounds bodies parsed into input.parsed_body.
	MaxBodyBytes int
	// ProtoDescriptors, if set, decode the request messages of gRPC calls
	// to the services they describe into input.parsed_body (Envoy must
	// send the body with pack_as_bytes). See LoadProtoDescriptors.
	ProtoDescriptors *protoregistry.Files
	// FullInput builds every input field even when the policy cannot read
	// it. Decisions are the same; it costs time and helps debugging.
	FullInput bool
	// Metrics, if set, count every decision.
	Metrics *Metrics
	Clock   clockwork.Clock
	Logger  *slog.Logger
}

// Enforcer decides requests. It is safe for concurrent use.
type Enforcer struct {
	engine    *policy.Engine
	also      []*policy.Engine
	candidate *policy.Engine
	candAlso  []*policy.Engine
	candErr   error
	// decision is DecisionPath's answer, joined once: Server.Check
	// compares it with every request's writ.authz_decision.
	decision  string
	sink      Sink
	body      bodyParser
	fullInput bool
	metrics   *Metrics
	need      atomic.Pointer[genNeed]
	peerCerts peerNotAfter
	// factsAnswers counts decisions made without an input document.
	factsAnswers atomic.Uint64
	clock        clockwork.Clock
	log          *slog.Logger
}

// New checks opts and returns an Enforcer. A sink is required: decisions
// are never made unrecorded.
func New(opts Options) (*Enforcer, error) {
	if opts.Engine == nil {
		return nil, errors.New("enforcer: no policy engine")
	}
	if opts.Sink == nil {
		return nil, errors.New("enforcer: no audit sink")
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if slices.Contains(opts.Also, nil) || slices.Contains(opts.CandidateAlso, nil) {
		return nil, errors.New("enforcer: nil engine in Also or CandidateAlso")
	}
	if len(opts.CandidateAlso) > 0 && opts.Candidate == nil {
		return nil, errors.New("enforcer: CandidateAlso without Candidate")
	}
	decision := opts.Engine.DecisionPath().String()
	for _, a := range opts.Also {
		decision += "," + a.DecisionPath().String()
	}
	return &Enforcer{engine: opts.Engine, also: slices.Clone(opts.Also), candidate: opts.Candidate, candAlso: slices.Clone(opts.CandidateAlso), candErr: opts.CandidateErr, decision: decision, sink: opts.Sink, body: bodyParser{max: opts.MaxBodyBytes, protos: opts.ProtoDescriptors}, fullInput: opts.FullInput, metrics: opts.Metrics, clock: opts.Clock, log: opts.Logger}, nil
}

// DecisionPath is the query the enforcer's policy decides by, as
// data.envoy.authz.allow; with Also, all of its queries joined by ",",
// as in the writ.authz_decision context extension.
func (e *Enforcer) DecisionPath() string { return e.decision }

// Check decides req. It never fails: a request it cannot decide is denied,
// with the reason in the returned Decision, which has been recorded (or its
// recording failed, which also denies). The response may be shared with
// other calls: treat it as read-only.
func (e *Enforcer) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, Decision) {
	return e.check(ctx, req, false, "")
}

// CheckUnbound denies req, recorded like any decision, because the
// policy decisions bound to its destination (writ.authz_decision) cannot
// be evaluated: reason says why. A binding that cannot be honoured must
// not fall back to another policy's word.
func (e *Enforcer) CheckUnbound(ctx context.Context, req *authv3.CheckRequest, reason string) (*authv3.CheckResponse, Decision) {
	return e.check(ctx, req, true, reason)
}

// check decides req with decide, or denies it as unbound for reason. The
// two are called directly, not through a func value: a Decision whose
// address goes to an unknown function moves to the heap (a 352-byte
// allocation per request).
func (e *Enforcer) check(ctx context.Context, req *authv3.CheckRequest, unbound bool, reason string) (*authv3.CheckResponse, Decision) {
	start := e.clock.Now()
	d := Decision{Time: start}
	if id, err := uuid.NewV7(); err == nil {
		d.ID = id.String()
	}
	e.recordTransport(&d, req)
	var out outcome
	if unbound {
		out = e.denyUnbound(req, &d, reason)
	} else {
		out = e.decide(ctx, req, &d)
	}
	if d.Result != ResultAllow && d.Cause != CauseBadPath && req.GetAttributes().GetContextExtensions()[ModeContextKey] == ModeDryRun {
		// Dry-run mode: the policy's denial is recorded as what it would
		// have done, and the request goes through. A 400 for a path the
		// app could read differently from policy is not policy's answer
		// and stays.
		d.DryRun = &DryRun{Result: d.Result, HTTPStatus: d.HTTPStatus, Reason: d.Reason, PolicyRevision: d.PolicyRevision,
			MatchedRules: d.MatchedRules, Disagrees: true}
		d.Result, d.HTTPStatus, d.Cause = ResultAllow, http.StatusOK, CauseDryRunMode
		d.Reason = "dry-run mode, not enforced: " + d.Reason
		out = allowOutcome(nil, nil, nil, nil)
	}
	d.Latency = e.clock.Since(start)
	if err := e.sink.Record(ctx, d); err != nil {
		e.log.Error("audit sink refused decision; denying", "decision_id", d.ID, "err", err)
		d.Reason = fmt.Sprintf("audit sink: %v (was %s: %s)", err, d.Result, d.Reason)
		d.Cause = CauseAuditSink
		d.Result, d.HTTPStatus = ResultDeny, http.StatusServiceUnavailable
		out = denyOutcome(http.StatusServiceUnavailable, code.Code_UNAVAILABLE, nil, "", nil)
	}
	e.metrics.observe(d)
	return out.resp, d
}

func (e *Enforcer) denyUnbound(req *authv3.CheckRequest, d *Decision, reason string) outcome {
	f, _, _ := factsAndTarget(req)
	e.recordFacts(d, f)
	d.PolicyRevision = e.engine.Snapshot().Revision()
	return e.deny(d, http.StatusForbidden, code.Code_PERMISSION_DENIED, CausePolicyError, reason)
}

func (e *Enforcer) decide(ctx context.Context, req *authv3.CheckRequest, d *Decision) outcome {
	// One snapshot for building and evaluating: the input holds only what
	// this policy set (and the dry-run candidate) can read.
	snap := e.engine.Snapshot()
	d.PolicyRevision = snap.Revision()
	if h := req.GetAttributes().GetRequest().GetHttp(); h != nil {
		d.Host, d.Headers = h.GetHost(), h.GetHeaders()
	}
	var cand policy.Snapshot
	if e.candidate != nil {
		cand = e.candidate.Snapshot()
	}
	if !e.fullInput && e.candidate == nil && e.candErr == nil && len(e.also) == 0 && bodyless(req) {
		// The cache or the residual fast path may know the answer from a
		// few fields of the request: no input document needed.
		if f, target, err := factsAndTarget(req); err == nil {
			if res, ok := snap.EvalFacts(ctx, &requestView{req: req, target: target}); ok {
				e.recordFacts(d, f)
				e.factsAnswers.Add(1)
				v := verdictOf(res, nil)
				d.Result, d.HTTPStatus, d.Reason, d.Cause = v.result, v.out.status, v.reason, v.cause
				d.PolicyRevision, d.Cached, d.MatchedRules = v.revision, v.cached, v.rules
				return v.out
			}
		}
	}
	n := needAll
	if !e.fullInput && len(e.also) == 0 && len(e.candAlso) == 0 {
		// With several decisions the input is built whole: every one of
		// them reads it, and the multi-policy case is the rare one.
		n = e.needFor(snap, cand)
	}
	in, f, err := buildInputWith(req, e.body, n)
	e.recordFacts(d, f)
	if err != nil {
		if errors.Is(err, ErrBadPath) {
			return e.deny(d, http.StatusBadRequest, code.Code_INVALID_ARGUMENT, CauseBadPath, err.Error())
		}
		return e.deny(d, http.StatusForbidden, code.Code_PERMISSION_DENIED, CauseInputError, "input: "+err.Error())
	}
	v := judge(ctx, snap, in)
	if len(e.also) > 0 {
		v = judgeAll(ctx, e.engine, v, e.also, in)
	}
	d.Result, d.HTTPStatus, d.Reason, d.Cause = v.result, v.out.status, v.reason, v.cause
	d.PolicyRevision, d.Cached, d.MatchedRules = v.revision, v.cached, v.rules
	switch {
	case e.candidate != nil:
		c := judge(ctx, cand, in)
		if len(e.candAlso) > 0 {
			c = judgeAll(ctx, e.candidate, c, e.candAlso, in)
		}
		d.DryRun = &DryRun{
			Result:         c.result,
			HTTPStatus:     c.out.status,
			Reason:         c.reason,
			PolicyRevision: c.revision,
			MatchedRules:   c.rules,
			Disagrees:      c.result != v.result || c.out.status != v.out.status,
		}
	case e.candErr != nil:
		d.DryRun = &DryRun{Result: ResultDeny, HTTPStatus: http.StatusForbidden, Reason: "dry-run policy: " + e.candErr.Error(),
			PolicyRevision: d.PolicyRevision, Disagrees: v.result != ResultDeny || v.out.status != http.StatusForbidden}
	}
	return v.out
}

func (e *Enforcer) recordFacts(d *Decision, f requestFacts) {
	d.Source, d.Destination, d.Method = f.source, f.destination, f.method
	d.Path, d.RawPath, d.Protocol, d.GRPC, d.TraceID = f.path, f.rawPath, f.protocol, f.grpc, f.traceID
}

// verdict is one policy set's answer to one input.
type verdict struct {
	out                             outcome
	result, reason, revision, cause string
	cached                          bool
	rules                           []string
}

// judge evaluates snap on in and maps the answer; every failure is a deny
// with its reason.
func judge(ctx context.Context, snap policy.Snapshot, in ast.Value) verdict {
	res, err := snap.Eval(ctx, in)
	return verdictOf(res, err)
}

// judgeAll combines first, the verdict of eng (the enforcer's own
// decision, or its first dry-run candidate), with those of also: every
// decision must allow. The first that does not
// decides, its reason naming its query, and later ones are not evaluated;
// when all allow, their response headers and mutations are applied
// together, in order.
func judgeAll(ctx context.Context, eng *policy.Engine, first verdict, also []*policy.Engine, in ast.Value) verdict {
	if first.result != ResultAllow {
		first.reason = eng.DecisionPath().String() + ": " + first.reason
		return first
	}
	all := first
	parts := []outcome{first.out}
	for _, a := range also {
		v := judge(ctx, a.Snapshot(), in)
		if v.result != ResultAllow {
			v.reason = a.DecisionPath().String() + ": " + v.reason
			return v
		}
		all.cached = all.cached && v.cached
		all.rules = append(slices.Clone(all.rules), v.rules...)
		parts = append(parts, v.out)
	}
	all.out = mergeAllows(parts)
	all.reason = "every bound policy allowed"
	return all
}

// verdictOf maps one evaluation's result.
func verdictOf(res policy.Result, err error) verdict {
	v := verdict{revision: res.Revision, cached: res.Cached, result: ResultDeny, rules: res.Rules}
	denied := func(cause, reason string) verdict {
		v.out = plainDeny
		v.cause, v.reason = cause, reason
		return v
	}
	if err != nil {
		return denied(CausePolicyError, "policy error: "+err.Error())
	}
	if !res.Defined {
		return denied(CauseUndefined, "policy decision undefined")
	}
	out, err := mapDecision(res.Value)
	if err != nil {
		return denied(CauseInvalidDecision, "invalid policy decision: "+err.Error())
	}
	v.out, v.cause = out, CausePolicy
	if out.allowed {
		v.result, v.reason = ResultAllow, "policy allowed"
	} else {
		v.reason = "policy denied"
	}
	return v
}

// needFor is the input tree of snap and cand together, built once per pair
// of policy generations.
func (e *Enforcer) needFor(snap, cand policy.Snapshot) *need {
	key := [2]uint64{snap.Generation(), 0}
	if e.candidate != nil {
		key[1] = cand.Generation() + 1
	}
	if c := e.need.Load(); c != nil && c.gen == key {
		return c.n
	}
	paths, whole := snap.InputPaths()
	if e.candidate != nil && !whole {
		cp, cw := cand.InputPaths()
		paths, whole = append(slices.Clone(paths), cp...), cw
	}
	c := &genNeed{gen: key, n: newNeed(paths, whole)}
	e.need.Store(c)
	return c.n
}

type genNeed struct {
	gen [2]uint64
	n   *need
}

func (e *Enforcer) deny(d *Decision, status int, c code.Code, cause, reason string) outcome {
	d.Result, d.HTTPStatus, d.Cause, d.Reason = ResultDeny, status, cause, reason
	return denyOutcome(status, c, nil, "", nil)
}
