package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/policy"
)

func init() { commands["policy diff"] = (*cli).policyDiff }

// errChanged makes `writ policy diff --fail-on-change` exit 1.
var errChanged = errors.New("the candidate policy changes recorded decisions")

// pairDiff counts one service pair's replayed decisions.
type pairDiff struct {
	Source      string `json:"source"`
	Destination string `json:"destination"`
	Decisions   int    `json:"decisions"`
	Changed     int    `json:"changed"`
	AllowToDeny int    `json:"allow_to_deny"`
	DenyToAllow int    `json:"deny_to_allow"`
}

// diffExample is one decision the candidate would change.
type diffExample struct {
	ID          string    `json:"id"`
	Time        time.Time `json:"time"`
	Source      string    `json:"source"`
	Destination string    `json:"destination"`
	Method      string    `json:"method"`
	Path        string    `json:"path"`
	Recorded    string    `json:"recorded"`
	RecordedSt  int       `json:"recorded_status"`
	Candidate   string    `json:"candidate"`
	CandidateSt int       `json:"candidate_status"`
	Reason      string    `json:"candidate_reason"`
}

type diffReport struct {
	Since             time.Time     `json:"since"`
	CandidateRevision string        `json:"candidate_revision"`
	Replayed          int           `json:"replayed"`
	Changed           int           `json:"changed"`
	NotReplayable     int           `json:"not_replayable"`
	Truncated         bool          `json:"truncated"`
	Pairs             []pairDiff    `json:"pairs"`
	Examples          []diffExample `json:"examples"`
}

// policyDiff replays the recorded request decisions of a time window
// against a candidate policy and reports which would change: counts by
// service pair, then examples. Each request is rebuilt from its audit
// event (enforcer.ReplayRequest), so a policy reading what the event does
// not keep (headers off the allowlist, bodies) sees it missing.
func (c *cli) policyDiff(ctx context.Context, args []string) error {
	fs := c.flags("policy diff")
	candidate := fs.String("candidate", "", "candidate policy directory or OPA bundle (.tar.gz) (required)")
	since := fs.Duration("since", 24*time.Hour, "replay decisions recorded in this window up to now")
	decision := fs.String("decision", policy.DefaultDecisionPath, "the candidate's rule that decides")
	examples := fs.Int("examples", 10, "changed decisions to show")
	maxEvents := fs.Int("max-events", 100000, "replay at most this many decisions (newest first)")
	format := fs.String("format", "table", "output: table or json")
	failOnChange := fs.Bool("fail-on-change", false, "exit 1 when any decision would change")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *candidate == "" || *since <= 0 || *maxEvents <= 0 || *examples < 0 || (*format != "table" && *format != "json") {
		fs.Usage()
		return errUsage
	}
	opts := policy.Options{DecisionPath: *decision, CacheSize: -1}
	if st, err := os.Stat(*candidate); err == nil && !st.IsDir() {
		opts.Bundle = *candidate
	} else {
		opts.Dir = *candidate
	}
	engine, err := policy.NewEngine(ctx, opts)
	if err != nil {
		return fmt.Errorf("candidate policy: %w", err)
	}
	var got enforcer.Decision
	e, err := enforcer.New(enforcer.Options{Engine: engine, FullInput: true,
		Sink: enforcer.SinkFunc(func(_ context.Context, d enforcer.Decision) error { got = d; return nil })})
	if err != nil {
		return err
	}
	rep := diffReport{Since: time.Now().Add(-*since).UTC(), CandidateRevision: engine.Revision(), Pairs: []pairDiff{}, Examples: []diffExample{}}
	pairs := map[[2]string]*pairDiff{}
	q := url.Values{"kind": {audit.KindRequest}, "since": {since.String()}, "limit": {"1000"}}
	seen := 0
	for seen < *maxEvents {
		var page collector.Page
		if err := c.client.Do(ctx, http.MethodGet, "/v1/audit/events?"+q.Encode(), nil, &page); err != nil {
			return err
		}
		for _, r := range page.Events {
			if seen == *maxEvents {
				rep.Truncated = true
				break
			}
			seen++
			ev, err := rowEvent(r)
			if err != nil {
				return err
			}
			if !enforcer.Replayable(ev) {
				rep.NotReplayable++
				continue
			}
			req, err := enforcer.ReplayRequest(ev)
			if err != nil {
				rep.NotReplayable++
				continue
			}
			e.Check(ctx, req)
			rep.Replayed++
			k := [2]string{r.Source, r.Destination}
			p := pairs[k]
			if p == nil {
				p = &pairDiff{Source: r.Source, Destination: r.Destination}
				pairs[k] = p
			}
			p.Decisions++
			if got.Result == r.Result && got.HTTPStatus == r.Status {
				continue
			}
			p.Changed++
			rep.Changed++
			switch {
			case r.Result == enforcer.ResultAllow && got.Result == enforcer.ResultDeny:
				p.AllowToDeny++
			case r.Result == enforcer.ResultDeny && got.Result == enforcer.ResultAllow:
				p.DenyToAllow++
			}
			if len(rep.Examples) < *examples {
				rep.Examples = append(rep.Examples, diffExample{ID: r.ID, Time: r.Time, Source: r.Source, Destination: r.Destination,
					Method: r.Action, Path: r.Resource, Recorded: r.Result, RecordedSt: r.Status, Candidate: got.Result,
					CandidateSt: got.HTTPStatus, Reason: got.Reason})
			}
		}
		if page.Next == "" || rep.Truncated {
			break
		}
		q.Set("after", page.Next)
	}
	for _, p := range pairs {
		rep.Pairs = append(rep.Pairs, *p)
	}
	sort.Slice(rep.Pairs, func(i, j int) bool {
		a, b := rep.Pairs[i], rep.Pairs[j]
		if a.Changed != b.Changed {
			return a.Changed > b.Changed
		}
		if a.Source != b.Source {
			return a.Source < b.Source
		}
		return a.Destination < b.Destination
	})
	if *format == "json" {
		if err := printJSON(c.stdout, rep); err != nil {
			return err
		}
	} else {
		c.printDiff(rep)
	}
	if *failOnChange && rep.Changed > 0 {
		return errChanged
	}
	return nil
}

func (c *cli) printDiff(rep diffReport) {
	fmt.Fprintf(c.stdout, "Replayed %d request decisions since %s against candidate revision %s: %d would change.\n",
		rep.Replayed, rep.Since.Format(time.RFC3339), rep.CandidateRevision, rep.Changed)
	if rep.NotReplayable > 0 {
		fmt.Fprintf(c.stdout, "%d decisions were not made by policy (bad path, input error, audit refusal) and were not replayed.\n", rep.NotReplayable)
	}
	if rep.Truncated {
		fmt.Fprintln(c.stdout, "Stopped at --max-events; older decisions were not replayed.")
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nSOURCE\tDESTINATION\tDECISIONS\tCHANGED\tALLOW→DENY\tDENY→ALLOW")
	for _, p := range rep.Pairs {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\n", p.Source, p.Destination, p.Decisions, p.Changed, p.AllowToDeny, p.DenyToAllow)
	}
	_ = tw.Flush()
	if len(rep.Examples) == 0 {
		return
	}
	tw = tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nTIME\tSOURCE\tDESTINATION\tMETHOD\tPATH\tRECORDED\tCANDIDATE\tREASON")
	for _, x := range rep.Examples {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s %d\t%s %d\t%s\n", x.Time.Local().Format(time.RFC3339), x.Source, x.Destination,
			x.Method, x.Path, x.Recorded, x.RecordedSt, x.Candidate, x.CandidateSt, x.Reason)
	}
	_ = tw.Flush()
}

// rowEvent turns a queried row back into the event fields replay reads.
func rowEvent(r collector.Row) (audit.Event, error) {
	id, err := uuid.Parse(r.ID)
	if err != nil {
		return audit.Event{}, fmt.Errorf("event id %q: %w", r.ID, err)
	}
	attrs, err := json.Marshal(r.Attributes)
	if err != nil {
		return audit.Event{}, err
	}
	return audit.Event{ID: id, Time: r.Time, Kind: r.Kind, Principal: r.Source, Destination: r.Destination, Action: r.Action,
		Resource: r.Resource, Result: r.Result, Status: r.Status, Cause: r.Cause, TraceID: r.TraceID, Attributes: attrs}, nil
}
