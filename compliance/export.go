package compliance

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Export formats.
const (
	FormatJSON = "json"
	FormatCSV  = "csv" // a zip of one CSV file per section
	FormatPDF  = "pdf"
)

// Formats lists the export formats.
var Formats = []string{FormatJSON, FormatCSV, FormatPDF}

// Export renders r in format. The bytes depend only on r, so the same
// report exports to the same bytes.
func Export(r *Report, format string) ([]byte, error) {
	switch format {
	case FormatJSON:
		return JSON(r)
	case FormatCSV:
		return CSVZip(r)
	case FormatPDF:
		return PDF(r)
	}
	return nil, fmt.Errorf("%w: unknown format %q (want json, csv or pdf)", ErrBadOptions, format)
}

// JSON is the JSON export: the report, indented, with a final newline.
func JSON(r *Report) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return nil, fmt.Errorf("json export: %w", err)
	}
	return buf.Bytes(), nil
}

func ts(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func i64(n int64) string { return strconv.FormatInt(n, 10) }

// CSVFiles returns the CSV export's files by name, in archive order.
// Every file starts with a header row.
func CSVFiles(r *Report) ([]string, map[string][][]string) {
	s := &r.Sections
	files := map[string][][]string{}
	var names []string
	add := func(name string, header []string, rows [][]string) {
		names = append(names, name)
		files[name] = append([][]string{header}, rows...)
	}
	add("report.csv", []string{"field", "value"}, [][]string{
		{"schema_version", strconv.Itoa(r.SchemaVersion)},
		{"generated_at", ts(r.GeneratedAt)},
		{"generator", r.Generator},
		{"from", ts(r.Range.From)},
		{"to", ts(r.Range.To)},
		{"service", r.Scope.Service},
		{"namespace", r.Scope.Namespace},
		{"framework", r.Scope.Framework},
		{"control_mapping_version", r.MappingVersion},
		{"decisions_total", i64(s.Decisions.Total)},
		{"decisions_allow", i64(s.Decisions.Allow)},
		{"decisions_deny", i64(s.Decisions.Deny)},
		{"decision_api_answers", i64(s.Decisions.DecisionAPI)},
		{"mtls_requests", i64(s.MTLS.MTLS)},
		{"plaintext_requests", i64(s.MTLS.Plaintext)},
		{"mtls_share", strconv.FormatFloat(s.MTLS.Share, 'f', 6, 64)},
		{"changes_total", i64(s.Changes.Total)},
		{"certificates_issued", i64(s.Certificates.Issued)},
		{"certificates_renewed", i64(s.Certificates.Renewed)},
		{"certificates_refused", i64(s.Certificates.Refused)},
		{"admin_calls", i64(s.AdminAccess.Total)},
		{"integrity_ok", strconv.FormatBool(s.Integrity.OK)},
		{"integrity_events", i64(s.Integrity.Events)},
	})
	var rows [][]string
	for _, p := range s.Decisions.Pairs {
		rows = append(rows, []string{p.Source, p.Destination, i64(p.Allow), i64(p.Deny)})
	}
	add("decisions.csv", []string{"source", "destination", "allow", "deny"}, rows)
	rows = nil
	for _, d := range s.Decisions.ByDay {
		rows = append(rows, []string{d.Day, i64(d.Allow), i64(d.Deny)})
	}
	add("decisions_by_day.csv", []string{"day", "allow", "deny"}, rows)
	rows = nil
	for _, d := range s.Denied.Requests {
		rows = append(rows, []string{ts(d.Time), d.ID, d.Source, d.Destination, d.Action, d.Resource, strconv.Itoa(d.Status), d.Reason, d.Cause, d.PolicyRevision})
	}
	add("denied.csv", []string{"time", "id", "source", "destination", "action", "resource", "status", "reason", "cause", "policy_revision"}, rows)
	rows = nil
	for _, c := range s.Changes.Changes {
		rows = append(rows, []string{ts(c.Time), c.Origin, c.Kind, c.Namespace, c.Name, i64(c.Revision), c.Op, c.Author, strconv.Itoa(c.Added), strconv.Itoa(c.Removed)})
	}
	add("changes.csv", []string{"time", "origin", "kind", "namespace", "name", "revision", "op", "author", "lines_added", "lines_removed"}, rows)
	rows = nil
	for _, k := range s.Certificates.ByKind {
		rows = append(rows, []string{k.Kind, i64(k.Issued), i64(k.Renewed), i64(k.Refused), i64(k.Used), i64(k.LongestLifetimeSeconds)})
	}
	add("certificates.csv", []string{"kind", "issued", "renewed", "refused", "used", "longest_lifetime_seconds"}, rows)
	rows = nil
	for _, f := range s.Certificates.ExpiredInUse.Findings {
		rows = append(rows, []string{f.Principal, f.Basis, i64(f.Requests), ts(f.First), ts(f.Last)})
	}
	add("expired_in_use.csv", []string{"principal", "basis", "requests", "first", "last"}, rows)
	rows = nil
	for _, p := range s.MTLS.Attempts {
		rows = append(rows, []string{p.Source, p.Destination, i64(p.Requests), i64(p.Denied), ts(p.First), ts(p.Last)})
	}
	add("plaintext_attempts.csv", []string{"source", "destination", "requests", "denied", "first", "last"}, rows)
	rows = nil
	for _, e := range s.AdminAccess.Events {
		rows = append(rows, []string{ts(e.Time), e.Origin, e.Actor, e.Method, e.Path, strconv.Itoa(e.Status), e.Result})
	}
	add("admin_access.csv", []string{"time", "origin", "actor", "method", "path", "status", "result"}, rows)
	rows = nil
	for _, b := range s.Integrity.Breaks {
		rows = append(rows, []string{b.Source, strconv.FormatUint(b.Seq, 10), b.ID, b.Problem})
	}
	add("integrity_breaks.csv", []string{"source", "seq", "event_id", "problem"}, rows)
	rows = nil
	for _, c := range r.Controls {
		rows = append(rows, []string{c.Framework, c.ID, c.Title, c.Status, c.Finding, joinSections(c.Sections)})
	}
	add("controls.csv", []string{"framework", "control", "title", "status", "finding", "sections"}, rows)
	return names, files
}

func joinSections(s []string) string {
	var b bytes.Buffer
	for i, x := range s {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(x)
	}
	return b.String()
}

// CSVZip is the CSV export: a zip archive of CSVFiles, every entry dated
// with the report's generation time so the bytes are reproducible.
func CSVZip(r *Report) ([]byte, error) {
	names, files := CSVFiles(r)
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	add := func(name string, data []byte) error {
		w, err := zw.CreateHeader(&zip.FileHeader{Name: name, Method: zip.Deflate, Modified: r.GeneratedAt.UTC()})
		if err != nil {
			return err
		}
		_, err = w.Write(data)
		return err
	}
	// SHA256SUMS lists every CSV's hash in sha256sum's format, so a
	// reviewer who extracts the files can check them (sha256sum -c) after
	// verifying the archive's signature.
	var sums bytes.Buffer
	for _, name := range names {
		rows := files[name]
		for _, row := range rows {
			for i, c := range row {
				row[i] = cell(c)
			}
		}
		var f bytes.Buffer
		cw := csv.NewWriter(&f)
		if err := cw.WriteAll(rows); err != nil {
			return nil, fmt.Errorf("csv export %s: %w", name, err)
		}
		sum := sha256.Sum256(f.Bytes())
		fmt.Fprintf(&sums, "%s  %s\n", hex.EncodeToString(sum[:]), name)
		if err := add(name, f.Bytes()); err != nil {
			return nil, fmt.Errorf("csv export: %w", err)
		}
	}
	if err := add("SHA256SUMS", sums.Bytes()); err != nil {
		return nil, fmt.Errorf("csv export: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("csv export: %w", err)
	}
	return buf.Bytes(), nil
}

// cell defuses spreadsheet formulas: recorded text (a path, a reason)
// that starts like a formula gets a leading apostrophe, which spreadsheet
// programs show as text. Numbers and times never start that way.
func cell(s string) string {
	if s != "" && strings.ContainsRune("=+-@\t\r", rune(s[0])) {
		return "'" + s
	}
	return s
}
