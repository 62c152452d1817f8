package enforcer

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
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
	ev, err := DecisionEvent(d, s.Redaction, d.Headers)
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
	attrs := requestAttrs{RawPath: d.RawPath, Protocol: d.Protocol, LatencyUS: d.Latency.Microseconds(),
		Host: d.Host, GRPC: d.GRPC, Cached: d.Cached, MatchedRules: d.MatchedRules, Headers: r.Headers(headers)}
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
	if err := ev.SetCanonicalAttributes(&attrs); err != nil {
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
	Protocol     string         `json:"protocol"`
	RawPath      string         `json:"raw_path"`
}

var _ audit.CanonicalAppender = (*requestAttrs)(nil)

// AppendCanonicalJSON writes what encoding/json writes for a (fields in
// declaration order, which is key order; header names sorted) when every
// string is printable ASCII without quotes or backslashes, which is the
// common request; anything else, and dry-run results, are left to
// encoding/json.
func (a *requestAttrs) AppendCanonicalJSON(b []byte) ([]byte, bool) {
	if a.DryRun != nil {
		return b, false
	}
	ok := true
	b = append(b, '{')
	if a.Cached {
		b = append(b, `"cached":true,`...)
	}
	if a.GRPC {
		b = append(b, `"grpc":true,`...)
	}
	if len(a.Headers) > 0 {
		var arr [8]string
		keys := arr[:0]
		for k := range a.Headers {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		b = append(b, `"headers":{`...)
		for i, k := range keys {
			if i > 0 {
				b = append(b, ',')
			}
			v, isString := a.Headers[k].(string)
			b, ok = appendPlainString(b, k, ok && isString)
			b = append(b, ':')
			b, ok = appendPlainString(b, v, ok)
		}
		b = append(b, "},"...)
	}
	if a.Host != "" {
		b = append(b, `"host":`...)
		b, ok = appendPlainString(b, a.Host, ok)
		b = append(b, ',')
	}
	b = append(b, `"latency_us":`...)
	b = strconv.AppendInt(b, a.LatencyUS, 10)
	if len(a.MatchedRules) > 0 {
		b = append(b, `,"matched_rules":[`...)
		for i, r := range a.MatchedRules {
			if i > 0 {
				b = append(b, ',')
			}
			b, ok = appendPlainString(b, r, ok)
		}
		b = append(b, ']')
	}
	b = append(b, `,"protocol":`...)
	b, ok = appendPlainString(b, a.Protocol, ok)
	b = append(b, `,"raw_path":`...)
	b, ok = appendPlainString(b, a.RawPath, ok)
	return append(b, '}'), ok
}

// appendPlainString quotes s if every byte is printable ASCII other than
// a quote or a backslash (encoding/json writes those as they are), and
// reports false otherwise or if ok was already false.
func appendPlainString(b []byte, s string, ok bool) ([]byte, bool) {
	if !ok {
		return b, false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return b, false
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"'), true
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
