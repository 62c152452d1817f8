package enforcer

import (
	"context"
	"fmt"
	"net/http"

	"github.com/google/uuid"

	"github.com/writmesh/writ/audit"
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
	ev, err := DecisionEvent(d, s.Redaction, nil)
	if err != nil {
		return err
	}
	return s.Spool.Append(ctx, &ev)
}

// DecisionEvent builds the audit event of a decision. headers, when the
// caller has them, are filtered through r (Decision itself carries none).
// The decision's id becomes the event's id, so the two share one
// identifier.
func DecisionEvent(d Decision, r *audit.Redaction, headers map[string]string) (audit.Event, error) {
	id, err := uuid.Parse(d.ID)
	if err != nil || id.Version() != 7 {
		if id, err = uuid.NewV7(); err != nil {
			return audit.Event{}, fmt.Errorf("decision event id: %w", err)
		}
	}
	attrs := map[string]any{
		"raw_path":   d.RawPath,
		"protocol":   d.Protocol,
		"latency_us": d.Latency.Microseconds(),
	}
	if d.GRPC {
		attrs["grpc"] = true
	}
	if d.Cached {
		attrs["cached"] = true
	}
	if len(d.MatchedRules) > 0 {
		attrs["matched_rules"] = d.MatchedRules
	}
	if d.DryRun != nil {
		dr := map[string]any{
			"result": d.DryRun.Result, "http_status": d.DryRun.HTTPStatus, "reason": d.DryRun.Reason,
			"policy_revision": d.DryRun.PolicyRevision, "disagrees": d.DryRun.Disagrees,
		}
		if len(d.DryRun.MatchedRules) > 0 {
			dr["matched_rules"] = d.DryRun.MatchedRules
		}
		attrs["dry_run"] = dr
	}
	if h := r.Headers(headers); h != nil {
		attrs["headers"] = h
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
	if err := ev.SetAttributes(attrs); err != nil {
		return audit.Event{}, err
	}
	return ev, nil
}
