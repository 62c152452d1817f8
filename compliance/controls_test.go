package compliance

import (
	"slices"
	"strings"
	"testing"
)

func TestDefaultMapping(t *testing.T) {
	m, err := DefaultMapping()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := m.Frameworks(), []string{"soc2", "iso27001", "pci-dss-4", "hipaa", "nist-800-53"}; !slices.Equal(got, want) {
		t.Errorf("frameworks: got %v, want %v", got, want)
	}
	ids := map[string]bool{}
	for _, c := range m.Controls {
		ids[c.Framework+" "+c.ID] = true
		if c.Asks == "" || c.Shows == "" {
			t.Errorf("%s %s: no description", c.Framework, c.ID)
		}
	}
	for _, want := range []string{"soc2 CC6.1", "soc2 CC6.6", "soc2 CC6.7", "soc2 CC7.2", "soc2 CC8.1",
		"iso27001 A.5.15", "iso27001 A.8.5", "iso27001 A.8.15", "iso27001 A.8.16", "iso27001 A.8.24",
		"pci-dss-4 4.2", "pci-dss-4 7.2", "pci-dss-4 8.3", "pci-dss-4 10.2", "pci-dss-4 10.3", "pci-dss-4 10.5",
		"hipaa 164.312(a)(1)", "hipaa 164.312(b)", "hipaa 164.312(c)(1)", "hipaa 164.312(d)", "hipaa 164.312(e)(1)",
		"nist-800-53 AC-3", "nist-800-53 AC-6", "nist-800-53 AU-2", "nist-800-53 AU-3", "nist-800-53 AU-9",
		"nist-800-53 AU-10", "nist-800-53 IA-2", "nist-800-53 IA-5", "nist-800-53 SC-8", "nist-800-53 SC-13"} {
		if !ids[want] {
			t.Errorf("mapping lacks %s", want)
		}
	}
}

func TestParseMappingRefuses(t *testing.T) {
	ok := `{"framework": "f", "id": "1", "title": "t", "asks": "a", "shows": "s", "sections": ["mtls"], "check": ""}`
	tests := []struct{ name, doc, want string }{
		{"no version", `{"controls": []}`, "no version"},
		{"unknown field", `{"version": "v", "controls": [], "extra": 1}`, "unknown field"},
		{"unknown check", `{"version": "v", "controls": [` + strings.Replace(ok, `"check": ""`, `"check": "magic"`, 1) + `]}`, "unknown check"},
		{"unknown section", `{"version": "v", "controls": [` + strings.Replace(ok, `["mtls"]`, `["vibes"]`, 1) + `]}`, "unknown section"},
		{"no section", `{"version": "v", "controls": [` + strings.Replace(ok, `["mtls"]`, `[]`, 1) + `]}`, "no section"},
		{"duplicate", `{"version": "v", "controls": [` + ok + `,` + ok + `]}`, "twice"},
		{"no title", `{"version": "v", "controls": [` + strings.Replace(ok, `"title": "t"`, `"title": ""`, 1) + `]}`, "lacks"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseMapping([]byte(tt.doc))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want an error with %q", err, tt.want)
			}
		})
	}
	if _, err := ParseMapping([]byte(`{"version": "v", "controls": [` + ok + `]}`)); err != nil {
		t.Errorf("valid mapping refused: %v", err)
	}
}

func TestCSVCellDefusesFormulas(t *testing.T) {
	for in, want := range map[string]string{"=1+1": "'=1+1", "+x": "'+x", "-2": "'-2", "@a": "'@a", "\tx": "'\tx", "a=b": "a=b", "": "", "12": "12"} {
		if got := cell(in); got != want {
			t.Errorf("cell(%q): got %q, want %q", in, got, want)
		}
	}
}

// Text outside Windows-1252 (the PDF's built-in font) must not fail the
// export: it is shown as '?'.
func TestPDFNonLatinText(t *testing.T) {
	r := &Report{}
	r.Sections.Denied.Requests = []DeniedRequest{{Reason: "拒否 😀 é ü — “quoted”"}}
	b, err := PDF(r)
	if err != nil || len(b) == 0 || !strings.HasPrefix(string(b), "%PDF-") {
		t.Fatalf("pdf with non-Latin text: %d bytes, %v", len(b), err)
	}
}
