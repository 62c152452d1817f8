package compliance

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

//go:embed controls_v1.json
var controlsV1 []byte

// Mapping is a versioned list of controls and the report sections that
// give evidence for them. It is data (controls_v1.json), so that a new
// framework or a corrected mapping is a reviewed data change.
type Mapping struct {
	Version  string    `json:"version"`
	Note     string    `json:"note"`
	Controls []Control `json:"controls"`
}

// Control is one framework control as the mapping describes it.
type Control struct {
	Framework string   `json:"framework"`
	ID        string   `json:"id"`
	Title     string   `json:"title"`
	Asks      string   `json:"asks"`
	Sections  []string `json:"sections"`
	// Check names the computed test of the report that decides whether the
	// control is met; empty when the report only supplies evidence.
	Check string `json:"check"`
	Shows string `json:"shows"`
}

// Check names.
const (
	CheckMTLSComplete      = "mtls_complete"
	CheckIntegrityOK       = "integrity_ok"
	CheckNoExpiredInUse    = "no_expired_in_use"
	CheckChangesAttributed = "changes_attributed"
)

// Section names, as used in the mapping, the JSON export and the CSV
// file names.
const (
	SectionDecisions    = "decisions"
	SectionDenied       = "denied"
	SectionChanges      = "changes"
	SectionCertificates = "certificates"
	SectionMTLS         = "mtls"
	SectionAdminAccess  = "admin_access"
	SectionIntegrity    = "integrity"
)

var sectionNames = []string{SectionDecisions, SectionDenied, SectionChanges, SectionCertificates, SectionMTLS, SectionAdminAccess, SectionIntegrity}

var checks = map[string]bool{"": true, CheckMTLSComplete: true, CheckIntegrityOK: true, CheckNoExpiredInUse: true, CheckChangesAttributed: true}

// DefaultMapping returns the mapping built into this version of Writ.
func DefaultMapping() (*Mapping, error) { return ParseMapping(controlsV1) }

// ParseMapping reads and validates a mapping document.
func ParseMapping(b []byte) (*Mapping, error) {
	var m Mapping
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("control mapping: %w", err)
	}
	if m.Version == "" {
		return nil, fmt.Errorf("control mapping: no version")
	}
	seen := map[string]bool{}
	for i, c := range m.Controls {
		key := c.Framework + " " + c.ID
		switch {
		case c.Framework == "" || c.ID == "" || c.Title == "":
			return nil, fmt.Errorf("control mapping: control %d lacks framework, id or title", i)
		case seen[key]:
			return nil, fmt.Errorf("control mapping: %s listed twice", key)
		case !checks[c.Check]:
			return nil, fmt.Errorf("control mapping: %s: unknown check %q", key, c.Check)
		case len(c.Sections) == 0:
			return nil, fmt.Errorf("control mapping: %s maps to no section", key)
		}
		for _, s := range c.Sections {
			if !slices.Contains(sectionNames, s) {
				return nil, fmt.Errorf("control mapping: %s: unknown section %q", key, s)
			}
		}
		seen[key] = true
	}
	return &m, nil
}

// Frameworks lists the frameworks the mapping covers, in first-seen order.
func (m *Mapping) Frameworks() []string {
	var out []string
	for _, c := range m.Controls {
		if !slices.Contains(out, c.Framework) {
			out = append(out, c.Framework)
		}
	}
	return out
}

// Control statuses in a report.
const (
	StatusMet      = "met"
	StatusNotMet   = "not_met"
	StatusNoData   = "no_data"  // the check had nothing to look at
	StatusEvidence = "evidence" // no computed check: the sections are evidence for a reviewer
)

// ControlResult is one control evaluated against a report.
type ControlResult struct {
	Framework string   `json:"framework"`
	ID        string   `json:"id"`
	Title     string   `json:"title"`
	Asks      string   `json:"asks"`
	Shows     string   `json:"shows"`
	Sections  []string `json:"sections"`
	Check     string   `json:"check,omitempty"`
	Status    string   `json:"status"`
	Finding   string   `json:"finding"`
}

// evaluate applies the mapping's controls (of framework, or all when
// empty) to r.
func (m *Mapping) evaluate(r *Report, framework string) []ControlResult {
	out := []ControlResult{}
	for _, c := range m.Controls {
		if framework != "" && c.Framework != framework {
			continue
		}
		status, finding := runCheck(c.Check, r)
		out = append(out, ControlResult{Framework: c.Framework, ID: c.ID, Title: c.Title, Asks: c.Asks, Shows: c.Shows,
			Sections: c.Sections, Check: c.Check, Status: status, Finding: finding})
	}
	return out
}

func runCheck(check string, r *Report) (status, finding string) {
	s := &r.Sections
	switch check {
	case CheckMTLSComplete:
		switch {
		case s.MTLS.Requests == 0:
			return StatusNoData, "no requests in range"
		case s.MTLS.Plaintext == 0:
			return StatusMet, fmt.Sprintf("all %d requests carried a verified mesh identity (mTLS)", s.MTLS.Requests)
		default:
			return StatusNotMet, fmt.Sprintf("%d of %d requests had no mesh identity (plaintext)", s.MTLS.Plaintext, s.MTLS.Requests)
		}
	case CheckIntegrityOK:
		if s.Integrity.OK {
			return StatusMet, fmt.Sprintf("%d events from %d sources and %d checkpoints verified intact", s.Integrity.Events, s.Integrity.Sources, s.Integrity.Checkpoints)
		}
		return StatusNotMet, fmt.Sprintf("%d broken link(s) in the audit trail", len(s.Integrity.Breaks))
	case CheckNoExpiredInUse:
		n := len(s.Certificates.ExpiredInUse.Findings)
		switch {
		case s.MTLS.MTLS == 0:
			return StatusNoData, "no mTLS requests in range"
		case n == 0:
			return StatusMet, "no expired certificate seen in use (" + s.Certificates.ExpiredInUse.Method + ")"
		default:
			return StatusNotMet, fmt.Sprintf("%d principal(s) used a certificate that was expired or not on record (%s)", n, s.Certificates.ExpiredInUse.Method)
		}
	case CheckChangesAttributed:
		if s.Changes.Total == 0 {
			return StatusNoData, "no changes in range"
		}
		if s.Changes.Unattributed == 0 {
			return StatusMet, fmt.Sprintf("all %d changes name their author", s.Changes.Total)
		}
		return StatusNotMet, fmt.Sprintf("%d of %d changes name no author", s.Changes.Unattributed, s.Changes.Total)
	}
	return StatusEvidence, "evidence for a reviewer; no computed check"
}
