package proxy

import (
	"bytes"
	"log/slog"
	"os"
	"strings"
	"testing"
)

// TestOTLPTLSReloadBadFiles: a changed file that cannot be used (one
// larger than maxOTLPPEM, garbage in the CA file) keeps the material in
// force and is logged once, not again at every export until it changes;
// unchanged files are not read again; a good change is taken.
func TestOTLPTLSReloadBadFiles(t *testing.T) {
	pki, pki2 := newOTLPPKI(t), newOTLPPKI(t)
	s, err := OTLPTLSConfig(pki.caFile, pki.certFile, pki.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	roots, cert := s.roots, s.cert
	refused := func() int { return strings.Count(logs.String(), "cannot be used; keeping the last good") }

	if s.reload(log) || logs.Len() != 0 {
		t.Fatalf("nothing changed, yet reloaded or logged:\n%s", logs.String())
	}

	good, err := os.ReadFile(pki.certFile)
	if err != nil {
		t.Fatal(err)
	}
	// A valid certificate followed by padding: only the bound refuses it.
	replace(t, pki.certFile, append(good, bytes.Repeat([]byte("\n"), maxOTLPPEM)...))
	replace(t, pki.caFile, []byte("not a certificate\n"))
	for range 3 {
		if s.reload(log) {
			t.Fatal("unusable files reloaded")
		}
	}
	if n := refused(); n != 1 || !strings.Contains(logs.String(), "larger than") || !strings.Contains(logs.String(), "no PEM certificate") {
		t.Fatalf("want one error naming both files' faults, got %d:\n%s", n, logs.String())
	}
	if s.roots != roots || s.cert != cert {
		t.Fatal("the last good material was not kept")
	}

	for src, dst := range map[string]string{pki2.caFile: pki.caFile, pki2.certFile: pki.certFile, pki2.keyFile: pki.keyFile} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		replace(t, dst, b)
	}
	if !s.reload(log) || s.roots == roots || s.cert == cert {
		t.Fatalf("rotated files not taken:\n%s", logs.String())
	}
	if refused() != 1 || strings.Contains(logs.String(), "BEGIN") {
		t.Fatalf("logs after the rotation:\n%s", logs.String())
	}
}
