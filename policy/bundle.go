package policy

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
)

// Bundle is a policy directory packed as an OPA bundle, for writd's bundle
// service: writ-enforcer, writ-proxy and a stock OPA can all load it.
type Bundle struct {
	// Data is the bundle: a .tar.gz with a .manifest carrying Revision,
	// the policy modules (test modules left out) and one /data.json.
	Data []byte
	// Revision is the manifest revision of the directory, else its
	// content hash, as the engine names the set.
	Revision string
	// Hash is the content hash of the directory, fit for an ETag.
	Hash string
}

// BuildBundle reads the policy directory dir, compiles and smoke-tests it
// exactly as an Engine with opts would before a swap (opts.Dir and
// opts.Bundle are ignored), and packs the same bytes as an OPA bundle. A
// set that an engine would refuse is refused here, so a bad policy is
// never distributed. Safe for concurrent use.
func BuildBundle(ctx context.Context, dir string, opts Options) (*Bundle, error) {
	opts.Dir, opts.Bundle, opts.BundleKey = dir, "", nil
	opts.CacheSize = -1
	e, err := prepareEngine(opts)
	if err != nil {
		return nil, err
	}
	src, err := readSource(dir)
	if err != nil {
		return nil, err
	}
	if _, err := e.compile(ctx, src); err != nil {
		return nil, err
	}
	_, data, err := src.parse(e.caps, nil)
	if err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	names := make([]string, 0, len(src.files))
	for n := range src.files {
		if strings.HasSuffix(n, ".rego") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	b := bundle.Bundle{
		Manifest: bundle.Manifest{Revision: src.revision, Roots: &[]string{""}},
		Data:     data,
	}
	b.Manifest.SetRegoVersion(ast.RegoV1)
	if b.Data == nil {
		b.Data = map[string]any{}
	}
	for _, n := range names {
		b.Modules = append(b.Modules, bundle.ModuleFile{URL: "/" + n, Path: "/" + n, Raw: src.files[n].Data})
	}
	var buf bytes.Buffer
	if err := bundle.NewWriter(&buf).DisableFormat(true).Write(b); err != nil {
		return nil, fmt.Errorf("write bundle of %s: %w", dir, err)
	}
	return &Bundle{Data: buf.Bytes(), Revision: src.revision, Hash: src.hash}, nil
}

// DirFingerprint sums up the names, sizes and modification times of the
// files a load of dir would read, so that a poller can tell that nothing
// changed without reading them.
func DirFingerprint(dir string) (string, error) { return fingerprint(dir, "") }
