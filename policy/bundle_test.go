package policy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/open-policy-agent/opa/v1/bundle"
)

func ecKeyPEM(t *testing.T) (private, public string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}))
}

// writeBundle writes an OPA bundle with the pair policy, signed with
// signKey (PEM) unless it is empty; tamper changes the data after signing.
func writeBundle(t *testing.T, revision, signKey string, tamper bool) string {
	t.Helper()
	b := bundle.Bundle{
		Manifest: bundle.Manifest{Revision: revision, Roots: &[]string{""}},
		Data:     map[string]any{"mesh": map[string]any{"pairs": []any{map[string]any{"source": "spiffe://td/ns/a/sa/x", "destination": "spiffe://td/ns/b/sa/y"}}}},
		Modules: []bundle.ModuleFile{
			{Path: "/envoy/authz.rego", URL: "/envoy/authz.rego", Raw: []byte(pairPolicy)},
			{Path: "/envoy/authz_test.rego", URL: "/envoy/authz_test.rego", Raw: []byte("package envoy.authz_test\n\ntest_x if true\n")},
		},
	}
	if signKey != "" {
		if err := b.GenerateSignature(bundle.NewSigningConfig(signKey, "ES256", ""), "writ", false); err != nil {
			t.Fatal(err)
		}
	}
	if tamper {
		b.Data = map[string]any{"mesh": map[string]any{"pairs": []any{map[string]any{"source": "spiffe://td/ns/evil/sa/x", "destination": "spiffe://td/ns/b/sa/y"}}}}
	}
	var buf bytes.Buffer
	if err := bundle.NewWriter(&buf).Write(b); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "bundle.tar.gz")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBundles(t *testing.T) {
	priv, pub := ecKeyPEM(t)
	otherPriv, _ := ecKeyPEM(t)
	key := &BundleKey{ID: "writ", Algorithm: "ES256", Key: pub}
	tests := []struct {
		name    string
		file    string
		key     *BundleKey
		wantErr string
	}{
		{"unsigned, no key", writeBundle(t, "r1", "", false), nil, ""},
		{"signed, verified", writeBundle(t, "r1", priv, false), key, ""},
		{"unsigned, key required", writeBundle(t, "r1", "", false), key, "signature"},
		{"signed by another key", writeBundle(t, "r1", otherPriv, false), key, "verif"},
		{"tampered after signing", writeBundle(t, "r1", priv, true), key, "digest"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := NewEngine(context.Background(), Options{Bundle: tt.file, BundleKey: tt.key})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if e.Revision() != "r1" {
				t.Fatalf("revision %q, want the manifest's", e.Revision())
			}
			r, err := e.Eval(context.Background(), input(t, `{"attributes": {"source": {"principal": "spiffe://td/ns/a/sa/x"}, "destination": {"principal": "spiffe://td/ns/b/sa/y"}}}`))
			if err != nil || r.Value != true {
				t.Fatalf("eval %+v %v", r, err)
			}
		})
	}
	if _, err := NewEngine(context.Background(), Options{Dir: t.TempDir(), Bundle: writeBundle(t, "r", "", false)}); err == nil {
		t.Fatal("both a directory and a bundle accepted")
	}
}

func TestBundleReloadKeepsGoodOnBadSignature(t *testing.T) {
	priv, pub := ecKeyPEM(t)
	good := writeBundle(t, "r1", priv, false)
	e := newEngine(t, Options{Bundle: good, BundleKey: &BundleKey{ID: "writ", Algorithm: "ES256", Key: pub}})
	bs, err := os.ReadFile(writeBundle(t, "r2", priv, true))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(good, bs, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(context.Background()); err == nil || e.Revision() != "r1" {
		t.Fatalf("tampered bundle: err %v, revision %s", err, e.Revision())
	}
}

// TestBuildBundle: a directory packed by BuildBundle loads as a bundle
// (the way writ-enforcer loads what writd serves) with the same revision
// and the same decisions, test modules left out; a broken directory is
// refused with its file named.
func TestBuildBundle(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"envoy/authz.rego":      pairPolicy,
		"envoy/authz_test.rego": "package envoy.authz_test\n\ntest_x if true\n",
		"mesh/data.json":        pairData,
		".manifest":             `{"revision": "rev-7"}`,
	})
	ctx := context.Background()
	b, err := BuildBundle(ctx, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if b.Revision != "rev-7" || b.Hash == "" {
		t.Fatalf("revision %q hash %q, want rev-7 and a hash", b.Revision, b.Hash)
	}
	file := filepath.Join(t.TempDir(), "b.tar.gz")
	if err := os.WriteFile(file, b.Data, 0o600); err != nil {
		t.Fatal(err)
	}
	raw, err := bundle.NewReader(bytes.NewReader(b.Data)).Read()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range raw.Modules {
		if strings.HasSuffix(m.Path, "_test.rego") {
			t.Errorf("bundle carries test module %s", m.Path)
		}
	}
	fromDir := newEngine(t, Options{Dir: dir})
	fromBundle := newEngine(t, Options{Bundle: file})
	if fromBundle.Revision() != "rev-7" {
		t.Errorf("bundle engine revision %q, want rev-7", fromBundle.Revision())
	}
	for _, in := range []string{
		`{"attributes": {"source": {"principal": "spiffe://td/ns/a/sa/x"}, "destination": {"principal": "spiffe://td/ns/b/sa/y"}}}`,
		`{"attributes": {"source": {"principal": "spiffe://td/ns/b/sa/y"}, "destination": {"principal": "spiffe://td/ns/a/sa/x"}}}`,
	} {
		a, err := fromDir.Eval(ctx, input(t, in))
		if err != nil {
			t.Fatal(err)
		}
		c, err := fromBundle.Eval(ctx, input(t, in))
		if err != nil {
			t.Fatal(err)
		}
		if a.Value != c.Value {
			t.Errorf("%s: dir says %v, bundle says %v", in, a.Value, c.Value)
		}
	}
	again, err := BuildBundle(ctx, dir, Options{})
	if err != nil || again.Hash != b.Hash {
		t.Errorf("rebuild: hash %v (err %v), want %s", again, err, b.Hash)
	}
	writeFiles(t, dir, map[string]string{"envoy/broken.rego": "package envoy.authz\n\nallow if {\n"})
	if _, err := BuildBundle(ctx, dir, Options{}); err == nil || !strings.Contains(err.Error(), "broken.rego:") {
		t.Fatalf("err %v, want one naming broken.rego", err)
	}
}
