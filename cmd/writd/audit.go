package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/writmesh/writ/api/admin"
	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/internal/run"
	"github.com/writmesh/writ/store"
)

func init() { components = append(components, setupAudit) }

// setupAudit runs the audit collector: the gRPC service shippers send
// their spools to (authenticated by their SVIDs on listen.grpc), the task
// keeping daily partitions created ahead, and the admin routes for verify
// and query.
func setupAudit(ctx context.Context, d *deps) error {
	col := d.audit
	audit.RegisterCollector(d.grpc, col)
	cp := &collector.Checkpointer{Pool: d.pool, Certificate: d.ident.Certificate, Logger: d.log.With("component", "audit")}
	d.tasks = append(d.tasks, run.Task{Name: "audit-partitions", Run: col.Run}, run.Task{Name: "audit-checkpoints", Run: cp.Run})

	// Retention runs as its own role when one is configured: the role
	// that owns the partitions, which the collector's should not.
	ac := d.cfg.Audit
	rpool := d.pool
	if ac.RetentionDatabaseURL != "" {
		p, err := store.Open(ctx, ac.RetentionDatabaseURL)
		if err != nil {
			return fmt.Errorf("audit retention database: %w", err)
		}
		rpool = p
		d.tasks = append(d.tasks, run.Task{Name: "audit-retention-pool", Run: func(ctx context.Context) error {
			<-ctx.Done()
			p.Close()
			return nil
		}})
	} else {
		d.log.Warn("audit retention runs with writd's own database role; set audit.retention_database_url to a role that owns the partitions and revoke DROP from writd's")
	}
	ret, err := collector.NewRetainer(collector.Retainer{Pool: rpool, Keep: time.Duration(ac.RetentionDays) * 24 * time.Hour,
		Minimum: time.Duration(ac.MinRetentionDays) * 24 * time.Hour, Interval: ac.RetentionInterval.D(),
		Logger: d.log.With("component", "audit-retention")}, d.metrics)
	if err != nil {
		return err
	}
	d.tasks = append(d.tasks, run.Task{Name: "audit-retention", Run: ret.Run})

	d.adminMux.HandleFunc("GET /v1/audit/verify", func(w http.ResponseWriter, r *http.Request) {
		from, to, err := timeRange(r)
		if err != nil {
			admin.WriteError(w, http.StatusBadRequest, err.Error())
			return
		}
		b, err := d.ca.Bundle(r.Context())
		if err != nil {
			admin.WriteError(w, http.StatusServiceUnavailable, "trust bundle unavailable")
			return
		}
		roots := x509.NewCertPool()
		for _, c := range b.X509Authorities() {
			roots.AddCert(c)
		}
		res, err := collector.Verify(r.Context(), d.pool, collector.VerifyOptions{From: from, To: to, Roots: roots, Signer: authority.ControlPlaneID(d.td).String()})
		if err != nil {
			d.log.Error("audit verify", "err", err)
			admin.WriteError(w, http.StatusInternalServerError, "audit verify failed")
			return
		}
		if res.Breaks == nil {
			res.Breaks = []collector.Break{}
		}
		admin.WriteJSON(w, http.StatusOK, res)
	})
	followers := make(chan struct{}, maxAuditFollowers)
	d.adminMux.HandleFunc("GET /v1/audit/events", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		f := collector.Filter{Source: q.Get("source"), Recorder: q.Get("recorder"), Destination: q.Get("destination"),
			Result: q.Get("result"), Kind: q.Get("kind"), After: q.Get("after")}
		if q.Get("follow") == "true" {
			followAudit(w, r, d, f, followers)
			return
		}
		var err error
		if f.Since, f.Until, err = timeRange(r); err != nil {
			admin.WriteError(w, http.StatusBadRequest, err.Error())
			return
		}
		if l := q.Get("limit"); l != "" {
			if _, err := fmt.Sscan(l, &f.Limit); err != nil {
				admin.WriteError(w, http.StatusBadRequest, "limit is not a number")
				return
			}
		}
		page, err := collector.Query(r.Context(), d.pool, f)
		if errors.Is(err, collector.ErrBadFilter) {
			admin.WriteError(w, http.StatusBadRequest, err.Error())
			return
		}
		if err != nil {
			d.log.Error("audit query", "err", err)
			admin.WriteError(w, http.StatusInternalServerError, "audit query failed")
			return
		}
		admin.WriteJSON(w, http.StatusOK, page)
	})
	return nil
}

// timeRange reads from/to (RFC 3339) and since (a duration before now).
func timeRange(r *http.Request) (from, to time.Time, err error) {
	q := r.URL.Query()
	if s := q.Get("from"); s != "" {
		if from, err = time.Parse(time.RFC3339, s); err != nil {
			return from, to, fmt.Errorf("from: %w", err)
		}
	}
	if s := q.Get("since"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return from, to, fmt.Errorf("since: want a positive duration like 1h")
		}
		from = time.Now().Add(-d)
	}
	if s := q.Get("to"); s != "" {
		if to, err = time.Parse(time.RFC3339, s); err != nil {
			return from, to, fmt.Errorf("to: %w", err)
		}
	}
	return from, to, nil
}

// maxAuditFollowers bounds live tails: each holds a database connection
// of its own (outside the pool).
const maxAuditFollowers = 8

// followAudit streams matching events as they are committed, one JSON
// object per line (LISTEN/NOTIFY), until the client goes away or writd
// stops.
func followAudit(w http.ResponseWriter, r *http.Request, d *deps, f collector.Filter, slots chan struct{}) {
	select {
	case slots <- struct{}{}:
		defer func() { <-slots }()
	default:
		admin.WriteError(w, http.StatusServiceUnavailable, fmt.Sprintf("already %d audit followers; try later", cap(slots)))
		return
	}
	rc := http.NewResponseController(w)
	_ = rc.SetWriteDeadline(time.Time{}) // a tail runs as long as it is read
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return
	}
	enc := json.NewEncoder(w)
	err := collector.Follow(r.Context(), d.pool, f, func(row collector.Row) error {
		// A stalled reader must not hold the follower forever.
		_ = rc.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if err := enc.Encode(row); err != nil {
			return err
		}
		return rc.Flush()
	})
	if err != nil && r.Context().Err() == nil {
		d.log.Warn("audit follow ended", "err", err)
	}
}
