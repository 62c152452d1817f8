package main

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"time"

	"github.com/writmesh/writ/api/admin"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/compliance"
)

func init() { components = append(components, setupReports) }

// reportTimeout bounds one report's generation: below the admin socket's
// write timeout, so the caller gets a clear error rather than a cut
// connection.
const reportTimeout = 4 * time.Minute

// maxReportBytes bounds an export sent over the admin socket (the client
// reads at most 32 MiB, and base64 grows it by a third).
const maxReportBytes = 20 << 20

// ReportRequest is the body of POST /v1/reports.
type ReportRequest struct {
	From         time.Time `json:"from"`
	To           time.Time `json:"to"`
	Service      string    `json:"service,omitempty"`
	Namespace    string    `json:"namespace,omitempty"`
	Framework    string    `json:"framework,omitempty"`
	Format       string    `json:"format"`
	DeniedLimit  int       `json:"denied_limit,omitempty"`
	ChangesLimit int       `json:"changes_limit,omitempty"`
	AdminLimit   int       `json:"admin_limit,omitempty"`
	DeniedAfter  string    `json:"denied_after,omitempty"`
}

// ReportResponse is the last line of a successful answer: the export and
// its detached signature, both as the exact bytes to write (base64 in
// JSON).
type ReportResponse struct {
	Format    string `json:"format"`
	File      []byte `json:"file"`
	Signature []byte `json:"signature"`
	SHA256    string `json:"sha256"`
	Signer    string `json:"signer"`
	// Summary repeats the headline figures for the CLI to print.
	Summary ReportSummary `json:"summary"`
}

// ReportSummary is the report's headline.
type ReportSummary struct {
	Requests        int64  `json:"requests"`
	Denied          int64  `json:"denied"`
	DeniedListed    int    `json:"denied_listed"`
	DeniedNext      string `json:"denied_next,omitempty"`
	Changes         int64  `json:"changes"`
	IntegrityOK     bool   `json:"integrity_ok"`
	IntegrityEvents int64  `json:"integrity_events"`
	Millis          int64  `json:"millis"`
}

// ReportProgress is a streamed line: a section's work starts.
type ReportProgress struct {
	Section       string `json:"section"`
	Step          int    `json:"step"`
	Steps         int    `json:"steps"`
	ElapsedMillis int64  `json:"elapsed_ms"`
}

// reportLine is one line of POST /v1/reports' answer: exactly one field set.
type reportLine struct {
	Progress *ReportProgress `json:"progress,omitempty"`
	Result   *ReportResponse `json:"result,omitempty"`
	Error    string          `json:"error,omitempty"`
}

// reportStream writes JSON lines, flushing each, and starts the answer
// (200, application/x-ndjson) with the first.
type reportStream struct {
	w       http.ResponseWriter
	started bool
}

func (s *reportStream) send(l reportLine) {
	if !s.started {
		s.w.Header().Set("Content-Type", "application/x-ndjson")
		s.w.WriteHeader(http.StatusOK)
		s.started = true
	}
	b, _ := json.Marshal(l)
	_, _ = s.w.Write(append(b, '\n'))
	_ = http.NewResponseController(s.w).Flush()
}

// ReportEstimate is the answer of GET /v1/reports/estimate: how much the
// range holds, so the CLI can say what it is about to do.
type ReportEstimate struct {
	Events   int64 `json:"events"`
	Requests int64 `json:"requests"`
	Days     int   `json:"days"`
}

// setupReports adds the compliance report routes to the admin API. The
// report is generated and signed here because only writd holds the
// control-plane key.
func setupReports(ctx context.Context, d *deps) error {
	d.adminMux.HandleFunc("GET /v1/reports/estimate", func(w http.ResponseWriter, r *http.Request) {
		from, to, err := timeRange(r)
		if err != nil || from.IsZero() || to.IsZero() || !from.Before(to) {
			admin.WriteError(w, http.StatusBadRequest, "from and to (RFC 3339) are required, and from must be before to")
			return
		}
		qctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		var est ReportEstimate
		if err := d.pool.QueryRow(qctx, `SELECT count(*), count(*) FILTER (WHERE kind = 'request') FROM audit_events WHERE time >= $1 AND time < $2`, from, to).
			Scan(&est.Events, &est.Requests); err != nil {
			d.log.Error("report estimate", "err", err)
			admin.WriteError(w, http.StatusServiceUnavailable, "could not count the range's events in 30s; try a shorter range")
			return
		}
		est.Days = int(to.Sub(from).Hours()/24 + 0.999)
		admin.WriteJSON(w, http.StatusOK, est)
	})
	d.adminMux.HandleFunc("POST /v1/reports", func(w http.ResponseWriter, r *http.Request) {
		var req ReportRequest
		if !admin.Decode(w, r, &req) {
			return
		}
		admin.Note(r, "report", map[string]any{"from": req.From, "to": req.To, "format": req.Format,
			"service": req.Service, "namespace": req.Namespace, "framework": req.Framework})
		if !slices.Contains(compliance.Formats, req.Format) {
			admin.WriteError(w, http.StatusBadRequest, "format must be json, csv or pdf")
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
		gctx, cancel := context.WithTimeout(r.Context(), reportTimeout)
		defer cancel()
		// The answer streams JSON lines: one per section as its work
		// starts, then the result or an error. The stream starts with the
		// first section, so options refused up front still get an error
		// status.
		st := &reportStream{w: w}
		start := time.Now()
		rep, err := compliance.Generate(gctx, d.pool, compliance.Options{
			From: req.From, To: req.To, Service: req.Service, Namespace: req.Namespace, Framework: req.Framework,
			DeniedLimit: req.DeniedLimit, ChangesLimit: req.ChangesLimit, AdminLimit: req.AdminLimit, DeniedAfter: req.DeniedAfter,
			Roots: roots, Signer: authority.ControlPlaneID(d.td).String(), Generator: d.cfg.ReplicaID,
			Progress: func(section string, step, steps int) {
				st.send(reportLine{Progress: &ReportProgress{Section: section, Step: step, Steps: steps, ElapsedMillis: time.Since(start).Milliseconds()}})
			},
		})
		fail := func(code int, msg string) {
			admin.Note(r, "error", msg)
			if st.started {
				st.send(reportLine{Error: msg})
			} else {
				admin.WriteError(w, code, msg)
			}
		}
		switch {
		case errors.Is(err, compliance.ErrBadOptions):
			fail(http.StatusBadRequest, err.Error())
			return
		case errors.Is(gctx.Err(), context.DeadlineExceeded):
			fail(http.StatusServiceUnavailable, "the report took longer than "+reportTimeout.String()+"; narrow the range (--from/--to) or the scope (--service/--namespace)")
			return
		case err != nil:
			d.log.Error("report", "err", err)
			fail(http.StatusInternalServerError, "report generation failed; see writd's log")
			return
		}
		file, err := compliance.Export(rep, req.Format)
		if err != nil {
			d.log.Error("report export", "err", err)
			fail(http.StatusInternalServerError, "report export failed; see writd's log")
			return
		}
		if len(file) > maxReportBytes {
			fail(http.StatusRequestEntityTooLarge, "the export is larger than 20 MiB; lower the list limits or narrow the range")
			return
		}
		sig, err := compliance.Sign(file, d.ident.Certificate(), time.Now())
		if err != nil {
			d.log.Error("report sign", "err", err)
			fail(http.StatusInternalServerError, "report signing failed; see writd's log")
			return
		}
		sum := sha256.Sum256(file)
		admin.Note(r, "sha256", hex.EncodeToString(sum[:]))
		s := rep.Sections
		st.send(reportLine{Result: &ReportResponse{Format: req.Format, File: file, Signature: sig, SHA256: hex.EncodeToString(sum[:]),
			Signer: authority.ControlPlaneID(d.td).String(),
			Summary: ReportSummary{Requests: s.Decisions.Total, Denied: s.Denied.Total, DeniedListed: s.Denied.Returned, DeniedNext: s.Denied.Next,
				Changes: s.Changes.Total, IntegrityOK: s.Integrity.OK, IntegrityEvents: s.Integrity.Events, Millis: time.Since(start).Milliseconds()}}})
	})
	return nil
}
