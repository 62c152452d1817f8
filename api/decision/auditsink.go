package decision

import (
	"context"
	"fmt"

	"github.com/google/uuid"

	"github.com/writmesh/writ/audit"
)

// EventRecorder writes events into the audit table in one transaction,
// all or none, chained under source: audit/collector.Collector.
type EventRecorder interface {
	RecordBatch(ctx context.Context, source string, evs []*audit.Event) error
}

// AuditSink records the decision API's answers as audit events written
// straight into PostgreSQL before the answer is sent: writd runs next to
// the database, and its replicas are stateless, so a local spool would be
// a second copy on a disk a rescheduled replica loses. The price is that
// an unreachable database withholds answers (503), which is failing
// closed. One answer's records (an AuthZEN batch) commit together. Safe
// for concurrent use.
type AuditSink struct {
	Recorder EventRecorder
	// Source names this replica's chain (the control-plane ID#replica).
	Source string
}

var _ BatchSink = (*AuditSink)(nil)

// Record writes r.
func (s *AuditSink) Record(ctx context.Context, r Record) error {
	return s.RecordBatch(ctx, []Record{r})
}

// RecordBatch writes rs in one transaction.
func (s *AuditSink) RecordBatch(ctx context.Context, rs []Record) error {
	evs := make([]*audit.Event, len(rs))
	for i, r := range rs {
		ev, err := RecordEvent(r)
		if err != nil {
			return err
		}
		evs[i] = &ev
	}
	if err := s.Recorder.RecordBatch(ctx, s.Source, evs); err != nil {
		return fmt.Errorf("audit decision: %w", err)
	}
	return nil
}

// RecordEvent maps a record to its audit event (kind decision_api): the
// caller is the principal, the API the action, the endpoint or data path
// the resource. The input itself is never kept, only its digest.
func RecordEvent(r Record) (audit.Event, error) {
	id, err := uuid.Parse(r.ID)
	if err != nil || id.Version() != 7 {
		if id, err = uuid.NewV7(); err != nil {
			return audit.Event{}, fmt.Errorf("decision event id: %w", err)
		}
	}
	ev := audit.Event{
		ID: id, Time: audit.NormalizeTime(r.Time), Kind: audit.KindDecisionAPI,
		Principal: r.Caller, Action: r.API, Resource: r.Path, Result: r.Result,
		Reason: r.Reason, Cause: r.Cause, PolicyRevision: r.PolicyRevision, TraceID: r.RequestID,
	}
	attrs := map[string]any{"auth": r.Auth, "latency_us": r.Latency.Microseconds()}
	if r.Item > 0 {
		attrs["item"] = r.Item
	}
	if r.InputDigest != "" {
		attrs["input_digest"] = r.InputDigest
	}
	if len(r.MatchedRules) > 0 {
		attrs["matched_rules"] = r.MatchedRules
	}
	if err := ev.SetAttributes(attrs); err != nil {
		return audit.Event{}, err
	}
	return ev, nil
}
