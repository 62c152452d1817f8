package compliance

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/go-pdf/fpdf"
)

// PDF is the readable export: a first page with the range, scope,
// generation time and the audit trail's verification, a chart of
// decisions per day, then one titled table per section and the controls,
// with page numbers. It uses fpdf's built-in Helvetica (no font files);
// text outside Windows-1252 is shown as '?'.
func PDF(r *Report) ([]byte, error) {
	p := fpdf.New("L", "mm", "A4", "")
	p.SetCreationDate(r.GeneratedAt)
	p.SetModificationDate(r.GeneratedAt)
	p.SetCatalogSort(true)
	p.SetTitle("Writ compliance report", true)
	p.SetCreator("writd", true)
	p.SetProducer("Writ", true)
	p.SetAutoPageBreak(true, 15)
	p.AliasNbPages("{nb}")
	tr := p.UnicodeTranslatorFromDescriptor("")
	w := &pdfWriter{p: p, tr: tr}
	rangeText := ts(r.Range.From) + " to " + ts(r.Range.To)
	p.SetFooterFunc(func() {
		p.SetY(-12)
		p.SetFont("Helvetica", "", 8)
		p.SetTextColor(100, 100, 100)
		p.CellFormat(0, 5, tr("Writ compliance report, "+rangeText), "", 0, "L", false, 0, "")
		p.CellFormat(0, 5, fmt.Sprintf("Page %d of {nb}", p.PageNo()), "", 0, "R", false, 0, "")
		p.SetTextColor(0, 0, 0)
	})
	p.AddPage()
	s := &r.Sections

	p.SetFont("Helvetica", "B", 18)
	p.CellFormat(0, 10, "Writ compliance report", "", 1, "L", false, 0, "")
	p.Ln(2)
	scope := "all services"
	if r.Scope.Service != "" || r.Scope.Namespace != "" {
		var parts []string
		if r.Scope.Service != "" {
			parts = append(parts, "service "+r.Scope.Service)
		}
		if r.Scope.Namespace != "" {
			parts = append(parts, "namespace "+r.Scope.Namespace)
		}
		scope = strings.Join(parts, ", ")
	}
	framework := "all"
	if r.Scope.Framework != "" {
		framework = r.Scope.Framework
	}
	verify := fmt.Sprintf("INTACT: %d events from %d sources, %d signed checkpoints", s.Integrity.Events, s.Integrity.Sources, s.Integrity.Checkpoints)
	if !s.Integrity.OK {
		verify = fmt.Sprintf("BROKEN: %d broken link(s) among %d events from %d sources", len(s.Integrity.Breaks), s.Integrity.Events, s.Integrity.Sources)
	}
	if !s.Integrity.Signatures {
		verify += " (checkpoint signatures not checked)"
	}
	w.keyValues([][2]string{
		{"Range", rangeText},
		{"Scope", scope},
		{"Frameworks", framework},
		{"Generated", ts(r.GeneratedAt) + " by " + r.Generator},
		{"Audit verify", verify},
		{"Control mapping", r.MappingVersion},
		{"Report schema", "version " + strconv.Itoa(r.SchemaVersion)},
	})
	p.Ln(3)
	w.heading("Summary")
	w.keyValues([][2]string{
		{"Decisions", fmt.Sprintf("%d requests: %d allowed, %d denied (and %d decision API answers)", s.Decisions.Total, s.Decisions.Allow, s.Decisions.Deny, s.Decisions.DecisionAPI)},
		{"mTLS coverage", fmt.Sprintf("%s of requests over mTLS (%d of %d); %d plaintext", percent(s.MTLS.Share), s.MTLS.MTLS, s.MTLS.Requests, s.MTLS.Plaintext)},
		{"Changes", fmt.Sprintf("%d configuration and policy changes, %d without author", s.Changes.Total, s.Changes.Unattributed)},
		{"Certificates", fmt.Sprintf("%d issued, %d renewed, %d refused", s.Certificates.Issued, s.Certificates.Renewed, s.Certificates.Refused)},
		{"Expired in use", fmt.Sprintf("%d finding(s) (%s)", len(s.Certificates.ExpiredInUse.Findings), s.Certificates.ExpiredInUse.Method)},
		{"Admin access", fmt.Sprintf("%d calls and logins, %d failed", s.AdminAccess.Total, s.AdminAccess.Failed)},
	})
	p.Ln(3)
	w.chart(s.Decisions.ByDay)

	p.AddPage()
	w.heading("Controls")
	w.para("Status is computed where the report can decide it (met, not_met, no_data); \"evidence\" marks sections given to a reviewer. The mapping is Writ's own summary, version " + r.MappingVersion + ".")
	var rows [][]string
	for _, c := range r.Controls {
		rows = append(rows, []string{c.Framework, c.ID, c.Title, c.Status, c.Finding})
	}
	w.table([]string{"Framework", "Control", "Title", "Status", "Finding"}, []float64{28, 30, 55, 20, 144}, rows)

	w.heading("Decisions by service pair")
	rows = nil
	for _, x := range s.Decisions.Pairs {
		rows = append(rows, []string{orNone(x.Source), orNone(x.Destination), i64(x.Allow), i64(x.Deny)})
	}
	w.table([]string{"Source", "Destination", "Allow", "Deny"}, []float64{113, 114, 25, 25}, rows)
	if s.Decisions.PairsTruncated {
		w.para(fmt.Sprintf("Only the first %d pairs are listed.", MaxPairs))
	}

	w.heading(fmt.Sprintf("Denied requests (%d, %d listed)", s.Denied.Total, s.Denied.Returned))
	rows = nil
	for _, x := range s.Denied.Requests {
		rows = append(rows, []string{ts(x.Time), orNone(x.Source), orNone(x.Destination), x.Action + " " + x.Resource, strconv.Itoa(x.Status), x.Reason})
	}
	w.table([]string{"Time", "Source", "Destination", "Request", "Status", "Reason"}, []float64{45, 60, 60, 50, 14, 48}, rows)
	if s.Denied.Truncated {
		w.para("The list is cut at the report's limit; the JSON export's denied.next continues it.")
	}

	w.heading(fmt.Sprintf("Configuration and policy changes (%d, %d listed)", s.Changes.Total, s.Changes.Returned))
	rows = nil
	for _, x := range s.Changes.Changes {
		rows = append(rows, []string{ts(x.Time), x.Kind, x.Namespace + "/" + x.Name, i64(x.Revision), x.Op, orNone(x.Author), fmt.Sprintf("+%d -%d", x.Added, x.Removed)})
	}
	w.table([]string{"Time", "Kind", "Resource", "Rev", "Op", "Author", "Diff"}, []float64{45, 40, 70, 12, 20, 60, 30}, rows)

	w.heading("Certificate issuance and rotation")
	rows = nil
	for _, k := range s.Certificates.ByKind {
		rows = append(rows, []string{k.Kind, i64(k.Issued), i64(k.Renewed), i64(k.Refused), i64(k.Used), duration(k.LongestLifetimeSeconds)})
	}
	w.table([]string{"Kind", "Issued", "Renewed", "Refused", "Used", "Longest lifetime"}, []float64{50, 30, 30, 30, 30, 107}, rows)
	if l := s.Certificates.Longest; l != nil {
		w.para(fmt.Sprintf("Longest-lived leaf certificate issued: %s for %s, serial %s, issued %s, expires %s (%s).", l.Kind, l.SPIFFEID, l.Serial, ts(l.IssuedAt), ts(l.NotAfter), duration(l.Seconds)))
	}
	x := s.Certificates.ExpiredInUse
	w.para(fmt.Sprintf("Expired certificates seen in use: %d finding(s) over %d mTLS requests, method %s. %s", len(x.Findings), x.Checked, x.Method, methodNote(x.Method)))
	rows = nil
	for _, f := range x.Findings {
		rows = append(rows, []string{f.Principal, f.Basis, i64(f.Requests), ts(f.First), ts(f.Last)})
	}
	if len(rows) > 0 {
		w.table([]string{"Principal", "Basis", "Requests", "First", "Last"}, []float64{100, 22, 20, 67, 68}, rows)
	}

	w.heading("mTLS coverage")
	w.para(fmt.Sprintf("%s of %d requests carried a verified mesh identity (mTLS): %d; plaintext attempts: %d.", percent(s.MTLS.Share), s.MTLS.Requests, s.MTLS.MTLS, s.MTLS.Plaintext))
	rows = nil
	for _, a := range s.MTLS.Attempts {
		rows = append(rows, []string{orNone(a.Source), orNone(a.Destination), i64(a.Requests), i64(a.Denied), ts(a.First), ts(a.Last)})
	}
	if len(rows) > 0 {
		w.table([]string{"Source", "Destination", "Requests", "Denied", "First", "Last"}, []float64{60, 70, 20, 17, 55, 55}, rows)
	}

	w.heading(fmt.Sprintf("Admin access (%d, %d failed, %d listed)", s.AdminAccess.Total, s.AdminAccess.Failed, s.AdminAccess.Returned))
	rows = nil
	for _, e := range s.AdminAccess.Events {
		rows = append(rows, []string{ts(e.Time), e.Actor, e.Method, e.Path, strconv.Itoa(e.Status), e.Result})
	}
	w.table([]string{"Time", "Actor", "Method", "Path", "Status", "Result"}, []float64{50, 45, 20, 120, 17, 25}, rows)

	w.heading("Audit trail verification")
	w.para(verify + ".")
	rows = nil
	for _, b := range s.Integrity.Breaks {
		rows = append(rows, []string{b.Source, strconv.FormatUint(b.Seq, 10), b.Problem})
	}
	if len(rows) > 0 {
		w.table([]string{"Source", "Seq", "Problem"}, []float64{90, 20, 167}, rows)
	}

	if err := p.Error(); err != nil {
		return nil, fmt.Errorf("pdf export: %w", err)
	}
	var buf bytes.Buffer
	if err := p.Output(&buf); err != nil {
		return nil, fmt.Errorf("pdf export: %w", err)
	}
	return buf.Bytes(), nil
}

func methodNote(m string) string {
	if m == "recorded" {
		return "Each decision carried its peer certificate's NotAfter."
	}
	return "Decisions do not all carry their peer certificate's expiry; a finding means no certificate for that principal on record (issuance log) was valid at the request's time."
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

func percent(f float64) string { return strconv.FormatFloat(f*100, 'f', 2, 64) + "%" }

func duration(sec int64) string {
	if sec <= 0 {
		return "-"
	}
	return (time.Duration(sec) * time.Second).String()
}

type pdfWriter struct {
	p  *fpdf.Fpdf
	tr func(string) string
}

func (w *pdfWriter) heading(s string) {
	_, h := w.p.GetPageSize()
	if w.p.GetY() > h-40 {
		w.p.AddPage()
	}
	w.p.Ln(3)
	w.p.SetFont("Helvetica", "B", 13)
	w.p.CellFormat(0, 8, w.tr(s), "", 1, "L", false, 0, "")
}

func (w *pdfWriter) para(s string) {
	w.p.SetFont("Helvetica", "", 9)
	w.p.MultiCell(0, 4.5, w.tr(s), "", "L", false)
	w.p.Ln(1)
}

func (w *pdfWriter) keyValues(kv [][2]string) {
	for _, x := range kv {
		w.p.SetFont("Helvetica", "B", 10)
		w.p.CellFormat(40, 6, w.tr(x[0]), "", 0, "L", false, 0, "")
		w.p.SetFont("Helvetica", "", 10)
		w.p.MultiCell(0, 6, w.tr(x[1]), "", "L", false)
	}
}

// table draws a table with a repeated header after page breaks; cell text
// too wide for its column is cut with "...".
func (w *pdfWriter) table(header []string, widths []float64, rows [][]string) {
	p := w.p
	_, pageH := p.GetPageSize()
	drawHeader := func() {
		p.SetFont("Helvetica", "B", 8)
		p.SetFillColor(225, 230, 240)
		for i, h := range header {
			p.CellFormat(widths[i], 6, w.tr(h), "1", 0, "L", true, 0, "")
		}
		p.Ln(-1)
		p.SetFont("Helvetica", "", 8)
	}
	drawHeader()
	if len(rows) == 0 {
		p.CellFormat(sum(widths), 6, "(none)", "1", 1, "L", false, 0, "")
		return
	}
	for _, row := range rows {
		if p.GetY()+5.5 > pageH-15 {
			p.AddPage()
			drawHeader()
		}
		for i, c := range row {
			p.CellFormat(widths[i], 5.5, w.fit(w.tr(c), widths[i]-2), "1", 0, "L", false, 0, "")
		}
		p.Ln(-1)
	}
}

func (w *pdfWriter) fit(s string, width float64) string {
	if w.p.GetStringWidth(s) <= width {
		return s
	}
	for len(s) > 0 && w.p.GetStringWidth(s+"...") > width {
		s = s[:len(s)-1]
	}
	return s + "..."
}

func sum(xs []float64) float64 {
	var t float64
	for _, x := range xs {
		t += x
	}
	return t
}

// chart draws allowed and denied decisions per day as stacked bars.
func (w *pdfWriter) chart(days []Day) {
	p := w.p
	w.heading("Decisions per day")
	if len(days) == 0 {
		w.para("No request decisions in the range.")
		return
	}
	const chartW, chartH = 240.0, 45.0
	left, _, _, _ := p.GetMargins()
	x0, y0 := left+20, p.GetY()+2
	var top int64
	for _, d := range days {
		top = max(top, d.Allow+d.Deny)
	}
	if top == 0 {
		top = 1
	}
	p.SetDrawColor(120, 120, 120)
	p.Line(x0, y0, x0, y0+chartH)
	p.Line(x0, y0+chartH, x0+chartW, y0+chartH)
	p.SetFont("Helvetica", "", 7)
	p.SetXY(left, y0-2)
	p.CellFormat(19, 4, i64(top), "", 0, "R", false, 0, "")
	p.SetXY(left, y0+chartH-2)
	p.CellFormat(19, 4, "0", "", 0, "R", false, 0, "")
	slot := chartW / float64(len(days))
	bar := slot * 0.7
	for i, d := range days {
		x := x0 + float64(i)*slot + (slot-bar)/2
		ha := chartH * float64(d.Allow) / float64(top)
		hd := chartH * float64(d.Deny) / float64(top)
		p.SetFillColor(90, 150, 90)
		if ha > 0 {
			p.Rect(x, y0+chartH-ha, bar, ha, "F")
		}
		p.SetFillColor(200, 70, 60)
		if hd > 0 {
			p.Rect(x, y0+chartH-ha-hd, bar, hd, "F")
		}
	}
	// Day labels: at most about 12, so they stay legible.
	step := max(1, len(days)/12)
	for i := 0; i < len(days); i += step {
		p.SetXY(x0+float64(i)*slot, y0+chartH+1)
		p.CellFormat(slot*float64(step), 4, days[i].Day, "", 0, "L", false, 0, "")
	}
	p.SetXY(left, y0+chartH+7)
	p.SetFillColor(90, 150, 90)
	p.Rect(x0, p.GetY()+1, 3, 3, "F")
	p.SetX(x0 + 4)
	p.CellFormat(20, 5, "allowed", "", 0, "L", false, 0, "")
	p.SetFillColor(200, 70, 60)
	p.Rect(x0+26, p.GetY()+1, 3, 3, "F")
	p.SetX(x0 + 30)
	p.CellFormat(20, 5, "denied", "", 1, "L", false, 0, "")
}
