package main

import (
	"bufio"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/writmesh/writ/audit/collector"
)

func init() {
	commands["audit verify"] = (*cli).auditVerify
	commands["audit query"] = (*cli).auditQuery
}

// auditBreak and auditVerifyResult mirror writd's /v1/audit/verify answer.
type auditBreak struct {
	Source  string `json:"source"`
	Seq     uint64 `json:"seq"`
	ID      string `json:"id"`
	Problem string `json:"problem"`
}

type auditVerifyResult struct {
	Sources int          `json:"sources"`
	Events  int64        `json:"events"`
	Breaks  []auditBreak `json:"breaks"`
}

// errBroken makes writ exit 1 when verify finds a broken chain.
var errBroken = errors.New("audit trail is broken")

func (c *cli) auditVerify(ctx context.Context, args []string) error {
	fs := c.flags("audit verify")
	from := fs.String("from", "", "start of the range (RFC 3339); default: the beginning")
	to := fs.String("to", "", "end of the range (RFC 3339, exclusive); default: now")
	output := fs.String("o", "table", "output: table or json")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	q := url.Values{}
	if *from != "" {
		q.Set("from", *from)
	}
	if *to != "" {
		q.Set("to", *to)
	}
	var res auditVerifyResult
	if err := c.client.Do(ctx, http.MethodGet, "/v1/audit/verify?"+q.Encode(), nil, &res); err != nil {
		return err
	}
	if *output == "json" {
		if err := printJSON(c.stdout, res); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(c.stdout, "%d events from %d sources checked\n", res.Events, res.Sources)
		for _, b := range res.Breaks {
			fmt.Fprintf(c.stdout, "BROKEN %s seq %d (event %s): %s\n", b.Source, b.Seq, b.ID, b.Problem)
		}
		if len(res.Breaks) == 0 {
			fmt.Fprintln(c.stdout, "all chains intact")
		}
	}
	if len(res.Breaks) > 0 {
		return errBroken
	}
	return nil
}

func (c *cli) auditQuery(ctx context.Context, args []string) error {
	fs := c.flags("audit query")
	source := fs.String("source", "", "the request's source (caller SPIFFE ID)")
	dest := fs.String("destination", "", "the destination SPIFFE ID")
	recorder := fs.String("recorder", "", "the SPIFFE ID that recorded the events")
	result := fs.String("result", "", "allow or deny")
	kind := fs.String("kind", "", "event kind (request, config_change, ...)")
	since := fs.String("since", "", "only events newer than this duration (e.g. 1h)")
	limit := fs.Int("limit", 100, "events per page (at most 1000)")
	all := fs.Bool("all", false, "fetch every page")
	format := fs.String("format", "table", "output: table, json or csv")
	follow := fs.Bool("follow", false, "after the query, print events as they are committed (one JSON object per line with --format json) until interrupted")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *format != "table" && *format != "json" && *format != "csv" {
		return fmt.Errorf("unknown format %q: want table, json or csv", *format)
	}
	q := url.Values{}
	for k, v := range map[string]string{"source": *source, "destination": *dest, "recorder": *recorder, "result": *result, "kind": *kind, "since": *since} {
		if v != "" {
			q.Set(k, v)
		}
	}
	q.Set("limit", strconv.Itoa(*limit))
	// Rows keep their attributes as writd sent them: canonical JSON
	// (audit.CanonicalJSON), so printing re-indents them, never reorders.
	var rows []collector.Row
	for {
		var page collector.Page
		if err := c.client.Do(ctx, http.MethodGet, "/v1/audit/events?"+q.Encode(), nil, &page); err != nil {
			return err
		}
		rows = append(rows, page.Events...)
		if !*all || page.Next == "" {
			break
		}
		q.Set("after", page.Next)
	}
	if *follow {
		return c.followAudit(ctx, q, rows, *format)
	}
	switch *format {
	case "json":
		if rows == nil {
			rows = []collector.Row{}
		}
		return printJSON(c.stdout, rows)
	case "csv":
		w := csv.NewWriter(c.stdout)
		_ = w.Write([]string{"time", "id", "kind", "source", "destination", "action", "resource", "result", "status", "reason", "policy_revision", "recorder", "seq"})
		for _, r := range rows {
			_ = w.Write([]string{r.Time.Format(time.RFC3339Nano), r.ID, r.Kind, r.Source, r.Destination, r.Action, r.Resource, r.Result,
				strconv.Itoa(r.Status), r.Reason, r.PolicyRevision, r.Recorder, strconv.FormatUint(r.Seq, 10)})
		}
		w.Flush()
		return w.Error()
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tKIND\tSOURCE\tDESTINATION\tACTION\tRESOURCE\tRESULT\tSTATUS\tREASON")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", r.Time.Local().Format(time.RFC3339), r.Kind, r.Source, r.Destination, r.Action, r.Resource, r.Result, r.Status, r.Reason)
	}
	return tw.Flush()
}

// followAudit prints rows (the query's answer, oldest first) and then the
// live tail, one line per event: JSON lines with format json, else
// tab-separated columns, as each arrives.
func (c *cli) followAudit(ctx context.Context, q url.Values, rows []collector.Row, format string) error {
	q.Del("after")
	q.Del("limit")
	q.Del("since")
	q.Set("follow", "true")
	body, err := c.client.Tail(ctx, "/v1/audit/events?"+q.Encode())
	if err != nil {
		return err
	}
	defer body.Close()
	line := func(r collector.Row) error {
		if format == "json" {
			b, err := json.Marshal(r)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(c.stdout, "%s\n", b)
			return err
		}
		_, err := fmt.Fprintf(c.stdout, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", r.Time.Local().Format(time.RFC3339Nano), r.Kind, r.Source,
			r.Destination, r.Action, r.Resource, r.Result, r.Status, r.Reason)
		return err
	}
	for i := len(rows) - 1; i >= 0; i-- {
		if err := line(rows[i]); err != nil {
			return err
		}
	}
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		var r collector.Row
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return fmt.Errorf("follow: %w", err)
		}
		if err := line(r); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("follow: %w", err)
	}
	return errors.New("follow: writd closed the stream")
}
