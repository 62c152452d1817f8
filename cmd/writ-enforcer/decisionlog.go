package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/writmesh/writ/enforcer"
)

// decisionLog is the interim audit sink: one JSON line per decision,
// written before the answer goes back. The audit spool replaces it behind
// the same enforcer.Sink seam. Safe for concurrent use.
type decisionLog struct {
	mu sync.Mutex
	w  io.Writer
}

var _ enforcer.Sink = (*decisionLog)(nil)

// decisionLine is the JSON shape of one decision.
type decisionLine struct {
	Msg            string           `json:"msg"`
	ID             string           `json:"decision_id"`
	Time           string           `json:"time"`
	Source         string           `json:"source,omitempty"`
	Destination    string           `json:"destination,omitempty"`
	Method         string           `json:"method,omitempty"`
	Path           string           `json:"path,omitempty"`
	RawPath        string           `json:"raw_path,omitempty"`
	Protocol       string           `json:"protocol,omitempty"`
	GRPC           bool             `json:"grpc,omitempty"`
	Result         string           `json:"result"`
	HTTPStatus     int              `json:"http_status"`
	Reason         string           `json:"reason"`
	Cause          string           `json:"cause"`
	PolicyRevision string           `json:"policy_revision"`
	Cached         bool             `json:"cached,omitempty"`
	LatencyNS      int64            `json:"latency_ns"`
	TraceID        string           `json:"trace_id,omitempty"`
	DryRun         *enforcer.DryRun `json:"dry_run,omitempty"`
}

// Record writes d as one line. A write error is returned, which makes the
// enforcer deny: a decision that was not recorded is not an allow.
func (l *decisionLog) Record(_ context.Context, d enforcer.Decision) error {
	bs, err := json.Marshal(decisionLine{
		Msg: "decision", ID: d.ID, Time: d.Time.UTC().Format("2006-01-02T15:04:05.000000Z07:00"),
		Source: d.Source, Destination: d.Destination, Method: d.Method, Path: d.Path, RawPath: d.RawPath,
		Protocol: d.Protocol, GRPC: d.GRPC, Result: d.Result, HTTPStatus: d.HTTPStatus, Reason: d.Reason,
		Cause: d.Cause, PolicyRevision: d.PolicyRevision, Cached: d.Cached, LatencyNS: d.Latency.Nanoseconds(),
		TraceID: d.TraceID, DryRun: d.DryRun,
	})
	if err != nil {
		return fmt.Errorf("encode decision: %w", err)
	}
	bs = append(bs, '\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, err := l.w.Write(bs); err != nil {
		return fmt.Errorf("write decision log: %w", err)
	}
	return nil
}

// openDecisionLog opens the --decision-log destination: "-" is stderr,
// anything else a file appended to (created 0600: decisions name
// workloads and paths).
func openDecisionLog(dest string, stderr io.Writer) (*decisionLog, func(), error) {
	if dest == "-" || dest == "" {
		return &decisionLog{w: stderr}, func() {}, nil
	}
	f, err := os.OpenFile(dest, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("open decision log: %w", err)
	}
	return &decisionLog{w: f}, func() { f.Close() }, nil
}
