package decision

import (
	"context"
	"log/slog"
)

// LogSink writes every record to a structured log, one line each. It is
// the sink until the durable audit pipeline takes records; it never fails,
// so it cannot make the API fail closed when the log is lost. Safe for
// concurrent use.
type LogSink struct{ Log *slog.Logger }

var _ Sink = LogSink{}

// Record logs r at info level.
func (s LogSink) Record(ctx context.Context, r Record) error {
	s.Log.LogAttrs(ctx, slog.LevelInfo, "decision",
		slog.String("id", r.ID), slog.Time("time", r.Time),
		slog.String("caller", r.Caller), slog.String("auth", r.Auth),
		slog.String("api", r.API), slog.String("path", r.Path), slog.Int("item", r.Item),
		slog.String("request_id", r.RequestID), slog.String("input_digest", r.InputDigest),
		slog.String("result", r.Result), slog.String("cause", r.Cause), slog.String("reason", r.Reason),
		slog.String("policy_revision", r.PolicyRevision), slog.Duration("latency", r.Latency))
	return nil
}
