package collector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/writmesh/writ/audit"
)

// Filter selects events for Query. Empty fields match everything.
type Filter struct {
	Source      string // the request's source: the events' principal
	Recorder    string // the source that recorded the events: an exact source, or a SPIFFE ID for all its instances
	Destination string
	Result      string
	Kind        string
	Since       time.Time // inclusive
	Until       time.Time // exclusive
	Limit       int       // default 100, at most 1000
	After       string    // the Next cursor of the previous page
}

// Row is one event as Query returns it.
type Row struct {
	ID             string          `json:"id"`
	Time           time.Time       `json:"time"`
	Kind           string          `json:"kind"`
	Recorder       string          `json:"recorder"`
	Seq            uint64          `json:"seq"`
	Source         string          `json:"source"`
	Destination    string          `json:"destination"`
	Action         string          `json:"action"`
	Resource       string          `json:"resource"`
	Result         string          `json:"result"`
	Status         int             `json:"status"`
	Reason         string          `json:"reason"`
	Cause          string          `json:"cause"`
	PolicyRevision string          `json:"policy_revision"`
	TraceID        string          `json:"trace_id,omitempty"`
	Attributes     json.RawMessage `json:"attributes"`
}

// Page is one page of Query, newest first; Next is empty on the last.
type Page struct {
	Events []Row  `json:"events"`
	Next   string `json:"next,omitempty"`
}

// ErrBadFilter marks a Query refused for its filter (a caller's mistake).
var ErrBadFilter = errors.New("bad audit query")

// Query returns events matching f, newest first, paginated by a keyset
// cursor on (time, id) so that pages stay stable while events arrive.
func Query(ctx context.Context, pool *pgxpool.Pool, f Filter) (Page, error) {
	if f.Limit <= 0 {
		f.Limit = 100
	}
	if f.Limit > 1000 {
		return Page{}, fmt.Errorf("%w: limit is at most 1000", ErrBadFilter)
	}
	var args []any
	where := filterWhere(f, &args)
	if !f.Since.IsZero() {
		args = append(args, f.Since)
		where = append(where, fmt.Sprintf("time >= $%d", len(args)))
	}
	if !f.Until.IsZero() {
		args = append(args, f.Until)
		where = append(where, fmt.Sprintf("time < $%d", len(args)))
	}
	if f.After != "" {
		ts, id, ok := strings.Cut(f.After, "_")
		t, err := time.Parse(time.RFC3339Nano, ts)
		u, err2 := uuid.Parse(id)
		if !ok || err != nil || err2 != nil {
			return Page{}, fmt.Errorf("%w: bad page cursor", ErrBadFilter)
		}
		args = append(args, t, u)
		where = append(where, fmt.Sprintf("(time, id) < ($%d, $%d)", len(args)-1, len(args)))
	}
	q := selectEvents
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	args = append(args, f.Limit+1)
	q += fmt.Sprintf(" ORDER BY time DESC, id DESC LIMIT $%d", len(args))
	rows, err := pool.Query(ctx, q, args...)
	if err != nil {
		return Page{}, fmt.Errorf("query events: %w", err)
	}
	evs, err := pgx.CollectRows(rows, scanEvent)
	if err != nil {
		return Page{}, fmt.Errorf("query events: %w", err)
	}
	p := Page{Events: []Row{}}
	for i, e := range evs {
		if i == f.Limit {
			last := evs[i-1]
			p.Next = last.Time.Format(time.RFC3339Nano) + "_" + last.ID.String()
			break
		}
		p.Events = append(p.Events, rowOf(e))
	}
	return p, nil
}

var zeroTime time.Time

// filterWhere turns f's field filters (not its time range or cursor)
// into SQL conditions, appending their arguments to args.
func filterWhere(f Filter, args *[]any) []string {
	var where []string
	add := func(cond string, v any) {
		*args = append(*args, v)
		where = append(where, fmt.Sprintf(cond, len(*args)))
	}
	if f.Source != "" {
		add("principal = $%d", f.Source)
	}
	if f.Recorder != "" {
		// A SPIFFE ID names all its instances' chains (ID#instance).
		*args = append(*args, f.Recorder)
		n := len(*args)
		where = append(where, fmt.Sprintf("(source = $%d OR starts_with(source, $%d || '#'))", n, n))
	}
	if f.Destination != "" {
		add("destination = $%d", f.Destination)
	}
	if f.Result != "" {
		add("result = $%d", f.Result)
	}
	if f.Kind != "" {
		add("kind = $%d", f.Kind)
	}
	return where
}

func rowOf(e audit.Event) Row {
	return Row{ID: e.ID.String(), Time: e.Time, Kind: e.Kind, Recorder: e.Source, Seq: e.Seq,
		Source: e.Principal, Destination: e.Destination, Action: e.Action, Resource: e.Resource, Result: e.Result,
		Status: e.Status, Reason: e.Reason, Cause: e.Cause, PolicyRevision: e.PolicyRevision, TraceID: e.TraceID, Attributes: e.Attributes}
}
