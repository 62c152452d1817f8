package agent

import (
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jonboulle/clockwork"
)

func TestLoadTrustBundle(t *testing.T) {
	w := newFakeWritd(t, clockwork.NewFakeClock())
	jsonBundle, err := w.bundle.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	pemBundle := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: w.root.Raw})
	tests := []struct {
		name    string
		data    []byte
		wantErr string
	}{
		{"spiffe json", jsonBundle, ""},
		{"pem", pemBundle, ""},
		{"pem with blank lines", append([]byte("\n\n"), pemBundle...), ""},
		{"garbage", []byte("hello"), "want SPIFFE bundle JSON or PEM"},
		{"json without x509", []byte(`{"keys":[]}`), "no X.509 authorities"},
		{"bad pem", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), "PEM"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bundle")
			if err := os.WriteFile(path, tt.data, 0o600); err != nil {
				t.Fatal(err)
			}
			b, err := LoadTrustBundle(path, w.td)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got err %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !b.HasX509Authority(w.root) {
				t.Fatal("root missing from loaded bundle")
			}
		})
	}
}
