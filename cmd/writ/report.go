package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/writmesh/writ/compliance"
)

func init() {
	commands["report generate"] = (*cli).reportGenerate
	commands["report verify"] = (*cli).reportVerify
}

// reportRequest, reportResponse and reportEstimate mirror writd's
// /v1/reports API.
type reportRequest struct {
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

type reportResponse struct {
	Format    string `json:"format"`
	File      []byte `json:"file"`
	Signature []byte `json:"signature"`
	SHA256    string `json:"sha256"`
	Signer    string `json:"signer"`
	Summary   struct {
		Requests        int64  `json:"requests"`
		Denied          int64  `json:"denied"`
		DeniedListed    int    `json:"denied_listed"`
		DeniedNext      string `json:"denied_next"`
		Changes         int64  `json:"changes"`
		IntegrityOK     bool   `json:"integrity_ok"`
		IntegrityEvents int64  `json:"integrity_events"`
		Millis          int64  `json:"millis"`
	} `json:"summary"`
}

type reportLine struct {
	Progress *struct {
		Section       string `json:"section"`
		Step          int    `json:"step"`
		Steps         int    `json:"steps"`
		ElapsedMillis int64  `json:"elapsed_ms"`
	} `json:"progress"`
	Result *reportResponse `json:"result"`
	Error  string          `json:"error"`
}

type reportEstimate struct {
	Events   int64 `json:"events"`
	Requests int64 `json:"requests"`
	Days     int   `json:"days"`
}

// parseWhen reads RFC 3339 or a UTC date (YYYY-MM-DD).
func parseWhen(flagName, s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	if t, err := time.Parse("2006-01-02", s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("--%s %q: want RFC 3339 (2026-03-01T00:00:00Z) or a date (2026-03-01)", flagName, s)
}

func (c *cli) reportGenerate(ctx context.Context, args []string) error {
	fs := c.flags("report generate")
	fromS := fs.String("from", "", "start of the range, inclusive (RFC 3339 or YYYY-MM-DD, UTC) (required)")
	toS := fs.String("to", "", "end of the range, exclusive (RFC 3339 or YYYY-MM-DD, UTC) (required)")
	service := fs.String("service", "", "only requests from or to this service (SPIFFE ID or service account name)")
	namespace := fs.String("namespace", "", "only requests from or to this namespace")
	framework := fs.String("framework", "", "only this framework's controls: soc2, iso27001, pci-dss-4, hipaa, nist-800-53")
	format := fs.String("format", "pdf", "json, csv (a zip of one CSV per section) or pdf")
	out := fs.String("o", "", "file to write (required); the signature goes to FILE.sig")
	sigOut := fs.String("sig", "", "signature file (default FILE.sig)")
	deniedLimit := fs.Int("denied-limit", 0, fmt.Sprintf("denied requests listed (default %d, at most %d)", compliance.DefaultListLimit, compliance.MaxListLimit))
	deniedAfter := fs.String("denied-after", "", "continue the denied list after this cursor (printed when the list was cut)")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *fromS == "" || *toS == "" || *out == "" {
		fmt.Fprintln(c.stderr, "writ report generate: --from, --to and -o are required")
		return errUsage
	}
	from, err := parseWhen("from", *fromS)
	if err != nil {
		return err
	}
	to, err := parseWhen("to", *toS)
	if err != nil {
		return err
	}
	if *sigOut == "" {
		*sigOut = *out + ".sig"
	}
	q := url.Values{"from": {from.UTC().Format(time.RFC3339)}, "to": {to.UTC().Format(time.RFC3339)}}
	var est reportEstimate
	if err := c.client.Do(ctx, http.MethodGet, "/v1/reports/estimate?"+q.Encode(), nil, &est); err != nil {
		return err
	}
	fmt.Fprintf(c.stderr, "range %s to %s (%s): %d audit events (%d request decisions)\n",
		from.UTC().Format(time.RFC3339), to.UTC().Format(time.RFC3339), to.Sub(from), est.Events, est.Requests)
	if est.Events > 1_000_000 {
		fmt.Fprintln(c.stderr, "a large range: writd verifies every event's hash; this may take minutes (it stops after 4)")
	}
	fmt.Fprintf(c.stderr, "generating the %s report on writd...\n", *format)
	var resp *reportResponse
	err = c.client.Stream(ctx, http.MethodPost, "/v1/reports", reportRequest{From: from, To: to, Service: *service, Namespace: *namespace,
		Framework: *framework, Format: *format, DeniedLimit: *deniedLimit, DeniedAfter: *deniedAfter}, func(line []byte) error {
		var l reportLine
		if err := json.Unmarshal(line, &l); err != nil {
			return fmt.Errorf("decode writd's answer: %w", err)
		}
		switch {
		case l.Error != "":
			return fmt.Errorf("writd: %s", l.Error)
		case l.Progress != nil:
			p := l.Progress
			fmt.Fprintf(c.stderr, "  [%d/%d] %s (%.1fs)\n", p.Step, p.Steps, p.Section, float64(p.ElapsedMillis)/1000)
		case l.Result != nil:
			resp = l.Result
		}
		return nil
	})
	if err != nil {
		return err
	}
	if resp == nil {
		return errors.New("writd's answer ended without a report")
	}
	// The signature is checked before anything is written: what lands on
	// disk is what writd signed.
	roots, err := c.trustRoots(ctx, "")
	if err != nil {
		return err
	}
	if _, err := compliance.VerifySignature(resp.File, resp.Signature, roots, ""); err != nil {
		return fmt.Errorf("writd's answer: %w", err)
	}
	if err := writeFileAtomic(*out, resp.File); err != nil {
		return err
	}
	if err := writeFileAtomic(*sigOut, resp.Signature); err != nil {
		return err
	}
	s := resp.Summary
	fmt.Fprintf(c.stderr, "%d requests, %d denied (%d listed), %d changes; audit trail %s (%d events); %d ms\n",
		s.Requests, s.Denied, s.DeniedListed, s.Changes, map[bool]string{true: "intact", false: "BROKEN"}[s.IntegrityOK], s.IntegrityEvents, s.Millis)
	if s.DeniedNext != "" {
		fmt.Fprintf(c.stderr, "the denied list was cut; continue with --denied-after %s\n", s.DeniedNext)
	}
	fmt.Fprintf(c.stdout, "wrote %s (%d bytes, sha256 %s) and %s, signed by %s\n", *out, len(resp.File), resp.SHA256, *sigOut, resp.Signer)
	return nil
}

// writeFileAtomic writes data to path through a temporary file in the
// same directory, readable by the owner only (reports name services and
// people).
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".writ-report-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// errBadSignature makes writ exit 1 when a report does not verify.
var errBadSignature = errors.New("report signature does not verify")

func (c *cli) reportVerify(ctx context.Context, args []string) error {
	fs := c.flags("report verify")
	sigPath := fs.String("sig", "", "signature file (default FILE.sig)")
	bundlePath := fs.String("bundle", "", "trust bundle (SPIFFE bundle JSON or PEM); default: writd's, over the admin socket")
	td := fs.String("trust-domain", "", "require the signer to be this trust domain's writd")
	// Flags may follow FILE.
	var file string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		file, args = args[0], args[1:]
	}
	rest, err := parse(fs, args, boolInt(file == ""))
	if err != nil {
		return err
	}
	if file == "" {
		file = rest[0]
	}
	if *sigPath == "" {
		*sigPath = file + ".sig"
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	sig, err := os.ReadFile(*sigPath)
	if err != nil {
		return fmt.Errorf("signature: %w", err)
	}
	roots, err := c.trustRoots(ctx, *bundlePath)
	if err != nil {
		return err
	}
	s, err := compliance.VerifySignature(data, sig, roots, *td)
	if err != nil {
		fmt.Fprintf(c.stdout, "FAILED %s: %v\n", file, err)
		return errBadSignature
	}
	fmt.Fprintf(c.stdout, "OK %s: %d bytes, sha256 %s, signed by %s at %s\n", file, s.Size, s.SHA256, s.Signer, s.SignedAt.Format(time.RFC3339))
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// trustRoots reads the bundle's X.509 authorities from a file (SPIFFE
// bundle JSON or PEM certificates) or from writd.
func (c *cli) trustRoots(ctx context.Context, path string) (*x509.CertPool, error) {
	var doc []byte
	var err error
	if path != "" {
		if doc, err = os.ReadFile(path); err != nil {
			return nil, err
		}
	} else if err := c.client.Do(ctx, http.MethodGet, "/v1/bundle", nil, &doc); err != nil {
		return nil, fmt.Errorf("%w (or pass --bundle FILE)", err)
	}
	pool := x509.NewCertPool()
	n := 0
	if strings.Contains(string(doc), "-----BEGIN") {
		rest := doc
		for {
			var b *pem.Block
			b, rest = pem.Decode(rest)
			if b == nil {
				break
			}
			cert, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("trust bundle: %w", err)
			}
			pool.AddCert(cert)
			n++
		}
	} else {
		b, err := parseAnyBundle(doc)
		if err != nil {
			return nil, fmt.Errorf("trust bundle: %w", err)
		}
		for _, cert := range b.X509Authorities() {
			pool.AddCert(cert)
			n++
		}
	}
	if n == 0 {
		return nil, errors.New("trust bundle holds no X.509 authority")
	}
	return pool, nil
}
