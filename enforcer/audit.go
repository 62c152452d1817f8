package enforcer

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/policy"
)

// AuditSink records decisions as audit events appended to a spool before
// the response is returned; a refused append (a full spool under
// fail-closed, a write error) is returned, which denies the request. It
// lives here rather than in audit because audit may not import enforcer.
// It is safe for concurrent use.
type AuditSink struct {
	Spool     *audit.Spool
	Redaction *audit.Redaction // may be nil: no headers kept
}

var _ Sink = (*AuditSink)(nil)

// Record appends d.
func (s *AuditSink) Record(ctx context.Context, d Decision) error {
	sc := scratchPool.Get().(*eventScratch)
	defer sc.release()
	ev, err := decisionEvent(d, s.Redaction, d.Headers, sc)
	if err != nil {
		return err
	}
	return s.Spool.Append(ctx, &ev)
}

// eventScratch holds the buffers one request event's attributes are
// built in; the spool copies them into its record, so they are reused
// (the allocations they save were most of the audited check's tail).
type eventScratch struct {
	buf     []byte
	headers [][2]string
}

var scratchPool = sync.Pool{New: func() any { return &eventScratch{buf: make([]byte, 0, 1024)} }}

func (sc *eventScratch) release() {
	clear(sc.headers) // no request strings kept alive
	sc.headers = sc.headers[:0]
	if cap(sc.buf) > 16<<10 {
		sc.buf = make([]byte, 0, 1024)
	}
	scratchPool.Put(sc)
}

// DecisionEvent builds the audit event of a decision. headers, when the
// caller has them, are filtered through r (Decision itself carries none).
// The decision's id becomes the event's id, so the two share one
// identifier.
func DecisionEvent(d Decision, r *audit.Redaction, headers map[string]string) (audit.Event, error) {
	return decisionEvent(d, r, headers, nil)
}

// decisionEvent is DecisionEvent with the attributes built in sc's
// buffers when sc is not nil: the event is then valid until sc is
// released.
func decisionEvent(d Decision, r *audit.Redaction, headers map[string]string, sc *eventScratch) (audit.Event, error) {
	id, err := uuid.Parse(d.ID)
	if err != nil || id.Version() != 7 {
		if id, err = uuid.NewV7(); err != nil {
			return audit.Event{}, fmt.Errorf("decision event id: %w", err)
		}
	}
	attrs := requestAttrs{RawPath: d.RawPath, Protocol: d.Protocol, LatencyUS: d.Latency.Microseconds(),
		Host: d.Host, GRPC: d.GRPC, Cached: d.Cached, MatchedRules: d.MatchedRules, MTLS: d.MTLS}
	if !d.PeerCertNotAfter.IsZero() {
		attrs.PeerCertNotAfter = d.PeerCertNotAfter.UTC().Format(time.RFC3339)
	}
	if d.DryRun != nil {
		attrs.DryRun = &dryRunAttrs{Result: d.DryRun.Result, HTTPStatus: d.DryRun.HTTPStatus, Reason: d.DryRun.Reason,
			PolicyRevision: d.DryRun.PolicyRevision, Disagrees: d.DryRun.Disagrees, MatchedRules: d.DryRun.MatchedRules}
	}
	status := d.HTTPStatus
	if status == 0 && d.Result == ResultAllow {
		status = http.StatusOK
	}
	ev := audit.Event{
		ID: id, Time: audit.NormalizeTime(d.Time), Kind: audit.KindRequest,
		Principal: d.Source, Destination: d.Destination, Action: d.Method, Resource: d.Path,
		Result: d.Result, Status: status, Reason: d.Reason, Cause: d.Cause,
		PolicyRevision: d.PolicyRevision, TraceID: d.TraceID,
	}
	var hs [][2]string
	var buf []byte
	if sc != nil {
		hs, buf = sc.headers[:0], sc.buf[:0]
	}
	hs = r.AppendHeaders(hs, headers)
	raw, ok := appendRequestAttrs(buf, &attrs, hs)
	if sc != nil {
		sc.headers, sc.buf = hs, raw
	}
	if ok {
		ev.SetCanonicalRaw(raw)
		return ev, nil
	}
	// A NUL or invalid UTF-8 somewhere: the general encoder spells them
	// canonically.
	attrs.Headers = r.Headers(headers)
	if err := ev.SetCanonicalAttributes(attrs); err != nil {
		return audit.Event{}, err
	}
	return ev, nil
}

// requestAttrs are a request event's attributes. Their JSON is canonical
// as encoded (fields in key order, integers only), which spares the
// request path a decode and re-encode; TestRequestAttributesAreCanonical
// holds them to audit.CanonicalJSON.
type requestAttrs struct {
	Cached       bool           `json:"cached,omitempty"`
	DryRun       *dryRunAttrs   `json:"dry_run,omitempty"`
	GRPC         bool           `json:"grpc,omitempty"`
	Headers      map[string]any `json:"headers,omitempty"`
	Host         string         `json:"host,omitempty"`
	LatencyUS    int64          `json:"latency_us"`
	MatchedRules []string       `json:"matched_rules,omitempty"`
	// MTLS and PeerCertNotAfter are what compliance reports read for
	// mTLS coverage and expired certificates seen in use.
	MTLS             bool   `json:"mtls"`
	PeerCertNotAfter string `json:"peer_cert_not_after,omitempty"`
	Protocol         string `json:"protocol"`
	RawPath          string `json:"raw_path"`
}

type dryRunAttrs struct {
	Disagrees      bool     `json:"disagrees"`
	HTTPStatus     int      `json:"http_status"`
	MatchedRules   []string `json:"matched_rules,omitempty"`
	PolicyRevision string   `json:"policy_revision"`
	Reason         string   `json:"reason"`
	Result         string   `json:"result"`
}

// PolicyReloadEvent is the audit event (kind policy_change) of a policy
// reload attempt: result ok with the revision now active, or error with
// the reason the attempted content was refused (the old revision stays).
// name says which policy (a directory, a bundle, "decision-api").
func PolicyReloadEvent(name string, r policy.ReloadEvent) (audit.Event, error) {
	ev, err := audit.NewEvent(audit.KindPolicyChange, time.Now())
	if err != nil {
		return audit.Event{}, err
	}
	ev.Action, ev.Resource, ev.PolicyRevision, ev.Result = "reload", name, r.Revision, "ok"
	if r.Err != nil {
		ev.Result, ev.Reason = "error", r.Err.Error()
	}
	if err := ev.SetAttributes(map[string]any{"attempted_revision": r.Attempted}); err != nil {
		return audit.Event{}, err
	}
	return ev, nil
}
