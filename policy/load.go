package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing/fstest"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/open-policy-agent/opa/v1/loader"
)

// Limits on what a policy directory may hold. They bound the memory a
// malicious or mistaken directory can make the loader use.
const (
	maxPolicyFiles = 4096
	maxPolicyBytes = 64 << 20
	manifestName   = ".manifest"
)

// source is one policy set read from disk: the bytes of every file that
// takes part, and the revision that names them.
type source struct {
	dir      string // the directory or bundle file, for messages
	files    fstest.MapFS
	bundle   []byte // an OPA bundle (.tar.gz) instead of files
	revision string
	hash     string
}

// readBundle reads an OPA bundle file. Its revision is the manifest's,
// known only once parsed; until then, the content hash.
func readBundle(file string) (*source, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("read policy bundle: %w", err)
	}
	defer f.Close()
	bs, err := io.ReadAll(io.LimitReader(f, maxPolicyBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read policy bundle %s: %w", file, err)
	}
	if len(bs) > maxPolicyBytes {
		return nil, fmt.Errorf("read policy bundle %s: larger than %d bytes", file, maxPolicyBytes)
	}
	sum := sha256.Sum256(bs)
	h := hex.EncodeToString(sum[:])
	return &source{dir: file, bundle: bs, hash: h, revision: "sha256:" + h[:16]}, nil
}

// parseBundle reads the bundle's modules (test modules left out, as from a
// directory) and data, verifying its signatures when vc is set.
func (s *source) parseBundle(caps *ast.Capabilities, vc *bundle.VerificationConfig) (map[string]*ast.Module, map[string]any, error) {
	b, err := bundle.NewReader(bytes.NewReader(s.bundle)).
		WithRegoVersion(ast.RegoV1).
		WithCapabilities(caps).
		WithProcessAnnotations(true).
		WithSizeLimitBytes(maxPolicyBytes).
		WithBundleVerificationConfig(vc).
		WithSkipBundleVerification(vc == nil).
		Read()
	if err != nil {
		return nil, nil, fmt.Errorf("policy bundle %s: %w", s.dir, flattenErr(err))
	}
	if b.Manifest.Revision != "" {
		s.revision = b.Manifest.Revision
	}
	mods := map[string]*ast.Module{}
	for _, m := range b.Modules {
		if strings.HasSuffix(m.Path, "_test.rego") {
			continue
		}
		mods[m.Path] = m.Parsed
	}
	if len(mods) == 0 {
		return nil, nil, fmt.Errorf("policy bundle %s: no policy modules", s.dir)
	}
	return mods, b.Data, nil
}

// isPolicyFile reports whether a file (by its slash-separated path relative
// to the policy directory) is part of the policy set the engine evaluates.
// Test modules are left out: they are run by RunTests, and their
// `with input as` overrides would defeat the input analysis of the cache.
func isPolicyFile(rel string) bool {
	base := path.Base(rel)
	switch {
	case strings.HasSuffix(base, "_test.rego"):
		return false
	case strings.HasSuffix(base, ".rego"), strings.HasSuffix(base, ".json"),
		strings.HasSuffix(base, ".yaml"), strings.HasSuffix(base, ".yml"):
		return !strings.HasPrefix(base, ".")
	}
	return false
}

// readSource reads the policy set under dir into memory so that the content
// hash, the parse and the compile all see the same bytes even if the
// directory changes while it is being read.
func readSource(dir string) (*source, error) {
	files := fstest.MapFS{}
	h := sha256.New()
	var total int64
	var names []string
	err := walkPolicyFiles(dir, func(rel, p string, _ fs.DirEntry) error {
		names = append(names, rel)
		if len(names) > maxPolicyFiles {
			return fmt.Errorf("more than %d policy files", maxPolicyFiles)
		}
		bs, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		total += int64(len(bs))
		if total > maxPolicyBytes {
			return fmt.Errorf("policy files exceed %d bytes", maxPolicyBytes)
		}
		files[rel] = &fstest.MapFile{Data: bs, Mode: 0o444}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read policy dir %s: %w", dir, err)
	}
	sort.Strings(names)
	for _, n := range names {
		// Length-prefixed so that no two file sets hash alike by shifting
		// bytes between a name and a body.
		fmt.Fprintf(h, "%d:%s%d:", len(n), n, len(files[n].Data))
		h.Write(files[n].Data)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	src := &source{dir: dir, files: files, hash: sum, revision: "sha256:" + sum[:16]}
	if m, ok := files[manifestName]; ok {
		var man struct {
			Revision string `json:"revision"`
		}
		if err := json.Unmarshal(m.Data, &man); err != nil {
			return nil, fmt.Errorf("read policy dir %s: %s: %w", dir, manifestName, err)
		}
		if man.Revision != "" {
			src.revision = man.Revision
		}
		delete(files, manifestName)
	}
	return src, nil
}

// walkPolicyFiles calls fn for every file of the policy set under dir (and
// its .manifest), skipping hidden directories and refusing anything but
// regular files.
func walkPolicyFiles(dir string, fn func(rel, path string, d fs.DirEntry) error) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			if rel != "." && strings.HasPrefix(d.Name(), ".") {
				return fs.SkipDir
			}
			return nil
		}
		if rel != manifestName && !isPolicyFile(rel) {
			return nil
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("%s: not a regular file", p)
		}
		return fn(rel, p, d)
	})
}

// fingerprint sums up the names, sizes and modification times of the files
// a load would read (or of the bundle file), so that a poll can tell that
// nothing changed without reading them.
func fingerprint(dir, bundleFile string) (string, error) {
	h := sha256.New()
	if bundleFile != "" {
		fi, err := os.Stat(bundleFile)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%d %d %v", fi.Size(), fi.ModTime().UnixNano(), fi.Mode())
		return hex.EncodeToString(h.Sum(nil)), nil
	}
	err := walkPolicyFiles(dir, func(rel, _ string, d fs.DirEntry) error {
		fi, err := d.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%d:%s %d %d %v\n", len(rel), rel, fi.Size(), fi.ModTime().UnixNano(), fi.Mode())
		return nil
	})
	return hex.EncodeToString(h.Sum(nil)), err
}

// parse parses the modules and data documents of src. Errors carry the
// file name and line.
func (s *source) parse(caps *ast.Capabilities, vc *bundle.VerificationConfig) (map[string]*ast.Module, map[string]any, error) {
	if s.bundle != nil {
		return s.parseBundle(caps, vc)
	}
	if len(s.files) == 0 {
		return nil, nil, fmt.Errorf("policy dir %s: no policy files", s.dir)
	}
	res, err := loader.NewFileLoader().
		WithFS(s.files).
		WithRegoVersion(ast.RegoV1).
		WithCapabilities(caps).
		WithProcessAnnotation(true).
		Filtered([]string{"."}, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("policy dir %s: %w", s.dir, flattenErr(err))
	}
	mods := make(map[string]*ast.Module, len(res.Modules))
	for _, m := range res.Modules {
		mods[m.Name] = m.Parsed
	}
	return mods, res.Documents, nil
}

// flattenErr joins OPA's multi-errors onto one line each so that the
// file:line of every problem reaches logs and admin events.
func flattenErr(err error) error {
	var errs loader.Errors
	if errors.As(err, &errs) {
		parts := make([]string, 0, len(errs))
		for _, e := range errs {
			parts = append(parts, e.Error())
		}
		return errors.New(strings.Join(parts, "; "))
	}
	return err
}
