// Package policy owns Writ's Rego policies: loading a policy directory,
// compiling it with OPA's Go API, preparing the decision query once,
// swapping a new policy set in only after it compiled and passed a smoke
// test, hot reload, Rego unit tests, and a decision cache for
// deterministic policies.
//
// It may import config and OPA; the enforcer, the decision API and the CLI
// import it, never the reverse.
package policy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/open-policy-agent/opa/v1/metrics"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown"
)

// DefaultDecisionPath is the rule opa-envoy-plugin queries by default, so
// that policies written for it run unchanged.
const DefaultDecisionPath = "data.envoy.authz.allow"

// DefaultCacheSize bounds the decision cache when Options.CacheSize is 0.
// With keys of at most 2 KiB the cache holds at most about 32 MiB of input.
const DefaultCacheSize = 1 << 14

// DefaultPollInterval is how often Run looks for a changed directory.
const DefaultPollInterval = 2 * time.Second

// fullReadPolls is how many polls Run lets pass between reads of the whole
// content when file sizes and times have not changed.
const fullReadPolls = 30

// networkBuiltins are removed from the capabilities of mesh policies unless
// Options.AllowNetwork is set: a policy that can call out can be made to
// hang or leak request data, and its answers cannot be cached.
var networkBuiltins = map[string]bool{
	"http.send":          true,
	"net.lookup_ip_addr": true,
}

// Options configure an Engine. The zero value of every field but Dir is a
// sensible default.
type Options struct {
	// Dir is the policy directory: Rego v1 modules (*.rego, test modules
	// excluded), data documents (*.json, *.yaml) placed under data by their
	// directory, and an optional .manifest whose revision names the set.
	Dir string
	// Bundle is an OPA bundle file (.tar.gz with .manifest), loaded instead
	// of Dir; its manifest revision names the set.
	Bundle string
	// BundleKey, if set, requires the bundle to carry a .signatures.json
	// signed with this key; an unsigned or badly signed bundle is refused.
	BundleKey *BundleKey
	// DecisionPath is the query evaluated for every decision.
	DecisionPath string
	// AllowNetwork keeps http.send and net.lookup_ip_addr available.
	AllowNetwork bool
	// LenientBuiltinErrors makes builtin errors undefined, as stock OPA
	// does. By default they are errors, so a decision that depended on a
	// failing builtin denies instead of silently taking another branch.
	LenientBuiltinErrors bool
	// SmokeInputs are evaluated against every candidate policy set before
	// it is swapped in; any evaluation error rejects the set. Defaults to
	// an empty input and an opa-envoy-shaped request.
	SmokeInputs []ast.Value
	// CacheSize bounds the decision cache in entries; negative disables it.
	CacheSize int
	// PollInterval is how often Run checks Dir for changes.
	PollInterval time.Duration
	// Clock drives Run's polling; tests pass a fake.
	Clock clockwork.Clock
	// Logger receives reloads and rejected policies.
	Logger *slog.Logger
	// OnReload, if set, is called after every reload attempt that saw new
	// content, with the error that rejected it if any. It is the hook for
	// metrics and admin events.
	OnReload func(ReloadEvent)
}

// BundleKey is the key that verifies signed bundles, as OPA configures one.
type BundleKey struct {
	ID string
	// Algorithm is a JWS algorithm: RS256, ES256, PS256, HS256, ...
	Algorithm string
	// Key is a PEM public key, or the secret for HS algorithms.
	Key string
}

func (k *BundleKey) verification() *bundle.VerificationConfig {
	if k == nil {
		return nil
	}
	id := k.ID
	if id == "" {
		id = "default"
	}
	return bundle.NewVerificationConfig(map[string]*bundle.KeyConfig{id: {Key: k.Key, Algorithm: k.Algorithm}}, id, "", nil)
}

// ReloadEvent reports one reload attempt.
type ReloadEvent struct {
	// Revision is the revision now active (the old one if Err != nil).
	Revision string
	// Attempted is the revision of the content that was tried.
	Attempted string
	Err       error
}

// Result is the outcome of one evaluation of the decision query.
type Result struct {
	// Defined is false when the decision query had no value.
	Defined bool
	// Value is the decision as JSON-shaped Go values (bool, string,
	// json.Number, []any, map[string]any, nil). It may be shared with the
	// cache and other callers: treat it as read-only.
	Value any
	// Revision names the policy set that produced the value.
	Revision string
	// Cached reports that the value came from the decision cache.
	Cached bool
	// Rules name the rules of the decision path that produced the value,
	// as "FILE:LINE RULE" ("rbac.rego:12 data.envoy.authz.allow", with
	// "default" before a default rule's path), in evaluation order; empty
	// when undefined or not known. Shared like Value: read-only.
	Rules []string
}

// Info describes the active policy set.
type Info struct {
	Revision      string
	Deterministic bool
	// NondeterministicBuiltin names why the cache is off, if it is.
	NondeterministicBuiltin string
	CacheEnabled            bool
	// CacheKeyPaths are the input paths the cache keys on; empty with
	// CacheEnabled means the whole input.
	CacheKeyPaths []string
	CacheEntries  int
	// ResidualPaths are the input paths evaluated per request on the
	// residual fast path (the policy partially evaluated on the other
	// paths); empty when the set has no fast path.
	ResidualPaths []string
	// ResidualAnswers counts decisions the fast path gave.
	ResidualAnswers uint64
	LoadedAt        time.Time
}

// compiledSet is one immutable, prepared policy set.
type compiledSet struct {
	gen      uint64 // increases with every swap in one engine
	revision string
	hash     string
	query    rego.PreparedEvalQuery
	an       analysis
	cache    *decisionCache // nil when off
	fast     *residuals     // nil when the set has no residual fast path
	loadedAt time.Time
	// compiler and store answer queries of other paths (EvalPath).
	compiler *ast.Compiler
	store    storage.Store
	paths    preparedPaths
	rules    *ruleIndex
	path     ast.Ref // the decision path
}

// Engine evaluates the active policy set and replaces it on reload. Eval is
// safe for concurrent use and never blocks on a reload: readers see either
// the old set or the new one, never a mix.
type Engine struct {
	opts   Options
	path   ast.Ref
	caps   *ast.Capabilities
	log    *slog.Logger
	clock  clockwork.Clock
	cur    atomic.Pointer[compiledSet]
	mu     sync.Mutex // serializes reloads
	tried  string     // content hash of the last attempted set
	lastEr error
}

// NewEngine loads, compiles and smoke-tests the policy set in opts.Dir. It
// fails if that set is unusable: there is no previous set to fall back on.
func NewEngine(ctx context.Context, opts Options) (*Engine, error) {
	if (opts.Dir == "") == (opts.Bundle == "") {
		return nil, errors.New("policy engine: want exactly one of a policy directory and a bundle")
	}
	e, err := prepareEngine(opts)
	if err != nil {
		return nil, err
	}
	if err := e.Reload(ctx); err != nil {
		return nil, err
	}
	return e, nil
}

// prepareEngine checks and defaults opts; the engine has no policy set yet.
func prepareEngine(opts Options) (*Engine, error) {
	if opts.BundleKey != nil && opts.Bundle == "" {
		return nil, errors.New("policy engine: a bundle key without a bundle")
	}
	if opts.DecisionPath == "" {
		opts.DecisionPath = DefaultDecisionPath
	}
	ref, err := parseDecisionPath(opts.DecisionPath)
	if err != nil {
		return nil, err
	}
	if opts.CacheSize == 0 {
		opts.CacheSize = DefaultCacheSize
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultPollInterval
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.SmokeInputs == nil {
		opts.SmokeInputs = defaultSmokeInputs()
	}
	return &Engine{opts: opts, path: ref, caps: capabilities(opts.AllowNetwork), log: opts.Logger, clock: opts.Clock}, nil
}

func parseDecisionPath(p string) (ast.Ref, error) {
	ref, err := ast.ParseRef(p)
	if err != nil {
		return nil, fmt.Errorf("decision path %q: %w", p, err)
	}
	if !ref.HasPrefix(ast.DefaultRootRef) || len(ref) < 2 || !ref.IsGround() {
		return nil, fmt.Errorf("decision path %q: must be a constant path under data", p)
	}
	return ref, nil
}

// capabilities are this OPA's builtins, minus network access unless allowed.
func capabilities(allowNetwork bool) *ast.Capabilities {
	caps := ast.CapabilitiesForThisVersion()
	if allowNetwork {
		return caps
	}
	kept := caps.Builtins[:0]
	for _, b := range caps.Builtins {
		if !networkBuiltins[b.Name] {
			kept = append(kept, b)
		}
	}
	caps.Builtins = kept
	return caps
}

// Reload reads the directory or bundle again and, if its content changed, compiles,
// smoke-tests and swaps in the new set. On any failure the active set stays
// and the error, naming file and line where OPA knows them, is returned.
func (e *Engine) Reload(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	src, err := e.read()
	if err != nil {
		return e.rejected("", err)
	}
	if cur := e.cur.Load(); cur != nil && cur.hash == src.hash {
		// Unchanged, or back to the running content after a rejected try.
		e.tried, e.lastEr = src.hash, nil
		return nil
	}
	e.tried = src.hash
	set, err := e.compile(ctx, src)
	if err != nil {
		return e.rejected(src.revision, err)
	}
	if cur := e.cur.Load(); cur != nil {
		set.gen = cur.gen + 1
	}
	prev := e.cur.Swap(set)
	e.lastEr = nil
	attrs := []any{"revision", set.revision, "deterministic", set.an.deterministic, "cache", set.cache != nil}
	if prev != nil {
		attrs = append(attrs, "previous", prev.revision)
	}
	e.log.Info("policy loaded", attrs...)
	if e.opts.OnReload != nil {
		e.opts.OnReload(ReloadEvent{Revision: set.revision, Attempted: set.revision})
	}
	return nil
}

func (e *Engine) read() (*source, error) {
	if e.opts.Bundle != "" {
		return readBundle(e.opts.Bundle)
	}
	return readSource(e.opts.Dir)
}

func (e *Engine) rejected(attempted string, err error) error {
	e.lastEr = err
	active := ""
	if cur := e.cur.Load(); cur != nil {
		active = cur.revision
	}
	e.log.Error("policy rejected", "attempted", attempted, "active", active, "err", err)
	if e.opts.OnReload != nil {
		e.opts.OnReload(ReloadEvent{Revision: active, Attempted: attempted, Err: err})
	}
	return err
}

func (e *Engine) compile(ctx context.Context, src *source) (*compiledSet, error) {
	mods, data, err := src.parse(e.caps, e.opts.BundleKey.verification())
	if err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	compiler := ast.NewCompiler().
		WithCapabilities(e.caps).
		WithDefaultRegoVersion(ast.RegoV1)
	compiler.Compile(mods)
	if compiler.Failed() {
		return nil, fmt.Errorf("compile: policy dir %s: %w", src.dir, joinASTErrors(compiler.Errors))
	}
	if len(compiler.GetRules(e.path)) == 0 && !dataHas(data, e.path) {
		return nil, fmt.Errorf("compile: policy dir %s: nothing defines decision path %s", src.dir, e.path)
	}
	store := inmem.NewFromObjectWithOpts(data, inmem.OptReturnASTValuesOnRead(true))
	pq, err := rego.New(
		rego.ParsedQuery(ast.NewBody(ast.NewExpr(ast.NewTerm(e.path)))),
		rego.Compiler(compiler),
		rego.Store(store),
		rego.StoreReadAST(true),
		rego.Capabilities(e.caps),
		rego.StrictBuiltinErrors(!e.opts.LenientBuiltinErrors),
	).PrepareForEval(ctx)
	if err != nil {
		return nil, fmt.Errorf("prepare %s: %w", e.path, err)
	}
	set := &compiledSet{
		revision: src.revision,
		hash:     src.hash,
		query:    pq,
		an:       analyse(compiler.Modules),
		loadedAt: e.clock.Now(),
		compiler: compiler,
		store:    store,
		paths:    preparedPaths{caps: e.caps, strict: !e.opts.LenientBuiltinErrors},
	}
	ix := newRuleIndex(compiler, e.path)
	set.rules, set.path = &ix, e.path
	for i, in := range e.opts.SmokeInputs {
		if _, err := set.eval(ctx, in); err != nil {
			return nil, fmt.Errorf("smoke test input %d: %w", i, err)
		}
	}
	if e.opts.CacheSize > 0 && set.an.deterministic {
		var paths [][]string
		if !set.an.wholeInput {
			paths = set.an.paths
			if paths == nil {
				paths = [][]string{} // reads no input at all
			}
		}
		set.cache = newDecisionCache(paths, e.opts.CacheSize)
		set.fast = newResiduals(compiler, store, e.path, set.an, e.caps, !e.opts.LenientBuiltinErrors, e.opts.CacheSize, set.rules)
	}
	return set, nil
}

func joinASTErrors(errs ast.Errors) error {
	parts := make([]string, 0, len(errs))
	for _, e := range errs {
		parts = append(parts, e.Error())
	}
	return errors.New(strings.Join(parts, "; "))
}

func dataHas(data map[string]any, ref ast.Ref) bool {
	var v any = data
	for _, t := range ref[1:] {
		m, ok := v.(map[string]any)
		if !ok {
			return false
		}
		s, ok := t.Value.(ast.String)
		if !ok {
			return false
		}
		if v, ok = m[string(s)]; !ok {
			return false
		}
	}
	return true
}

// Eval evaluates the decision query of the active set on input, which must
// be an object. It answers from the cache when the set is deterministic and
// an input that agrees on every path the set reads was seen before.
func (e *Engine) Eval(ctx context.Context, input ast.Value) (Result, error) {
	return e.Snapshot().Eval(ctx, input)
}

// Snapshot is one policy set, fixed: a caller that builds its input from
// the set's InputPaths must evaluate on the same snapshot, or a reload in
// between could read fields the input left out. Safe for concurrent use.
type Snapshot struct{ set *compiledSet }

// Snapshot returns the active policy set.
func (e *Engine) Snapshot() Snapshot { return Snapshot{e.cur.Load()} }

// Generation numbers the snapshot's policy set within its engine: it
// changes with every swap, so callers can key derived data on it.
func (s Snapshot) Generation() uint64 { return s.set.gen }

// Revision names the snapshot's policy set.
func (s Snapshot) Revision() string { return s.set.revision }

// InputPaths are the paths under input the set can read. When whole is
// true the set may read anything. Otherwise an input holding only these
// subtrees gets the same decision as the complete input, which lets a
// caller skip building the rest. The slices are shared: do not modify.
func (s Snapshot) InputPaths() (paths [][]string, whole bool) {
	if s.set.an.wholeInput {
		return nil, true
	}
	return s.set.an.paths, false
}

// Eval is Engine.Eval on this snapshot.
func (s Snapshot) Eval(ctx context.Context, input ast.Value) (Result, error) {
	set := s.set
	if err := ctx.Err(); err != nil {
		// A caller that has gone gets no decision, not even a cached one.
		return Result{Revision: set.revision}, fmt.Errorf("evaluate policy %s: %w", set.revision, err)
	}
	if set.cache == nil || !set.cache.use() {
		return set.evalFast(ctx, input)
	}
	key, sum, size := set.cache.key(input)
	if size > maxKeyBytes {
		return set.evalFast(ctx, input)
	}
	if r, ok := set.cache.get(key, sum); ok {
		r.Cached = true
		return r, nil
	}
	r, err := set.evalFast(ctx, input)
	if err != nil {
		return r, err
	}
	set.cache.put(key, sum, r)
	return r, nil
}

// evalFast answers from the residual fast path when the set has one and
// it applies to input, else evaluates in full.
func (s *compiledSet) evalFast(ctx context.Context, input ast.Value) (Result, error) {
	if s.fast != nil {
		if r, ok := s.fast.eval(ctx, input, s.revision); ok {
			return r, nil
		}
	}
	return s.eval(ctx, input)
}

func (s *compiledSet) eval(ctx context.Context, input ast.Value) (Result, error) {
	res := Result{Revision: s.revision}
	// Cancellation through AfterFunc rather than the goroutine per query
	// that rego starts otherwise: same effect, a fraction of the cost.
	c := topdown.NewCancel()
	stop := context.AfterFunc(ctx, c.Cancel)
	defer stop()
	opts := []rego.EvalOption{rego.EvalParsedInput(input), rego.EvalExternalCancel(c), rego.EvalMetrics(noMetrics)}
	var tr *matchTracer
	if s.rules != nil && s.rules.ambiguous {
		tr = &matchTracer{ix: s.rules}
		opts = append(opts, rego.EvalQueryTracer(tr))
	}
	rs, err := s.query.Eval(ctx, opts...)
	if err != nil {
		return res, fmt.Errorf("evaluate policy %s: %w", s.revision, err)
	}
	switch len(rs) {
	case 0:
		return res, nil
	case 1:
		if len(rs[0].Expressions) != 1 {
			return res, fmt.Errorf("evaluate policy %s: %d expressions in result", s.revision, len(rs[0].Expressions))
		}
		res.Defined = true
		res.Value = rs[0].Expressions[0].Value
		if tr != nil {
			res.Rules = tr.rules
		} else if s.rules != nil {
			res.Rules = s.rules.fromValue(res.Value)
		}
		return res, nil
	default:
		return res, fmt.Errorf("evaluate policy %s: %d results for a single decision", s.revision, len(rs))
	}
}

// Revision names the active policy set.
func (e *Engine) Revision() string { return e.cur.Load().revision }

// LastError is the error of the last rejected reload, nil once a later
// reload succeeded.
func (e *Engine) LastError() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.lastEr
}

// Info describes the active set.
func (e *Engine) Info() Info {
	s := e.cur.Load()
	in := Info{
		Revision:                s.revision,
		Deterministic:           s.an.deterministic,
		NondeterministicBuiltin: s.an.nondeterministic,
		CacheEnabled:            s.cache != nil,
		LoadedAt:                s.loadedAt,
	}
	if s.cache != nil {
		for _, p := range s.cache.paths {
			in.CacheKeyPaths = append(in.CacheKeyPaths, "input."+strings.Join(p, "."))
		}
		in.CacheEntries = s.cache.len()
	}
	if s.fast != nil {
		for _, p := range s.fast.unknown {
			in.ResidualPaths = append(in.ResidualPaths, "input."+strings.Join(p, "."))
		}
		in.ResidualAnswers = s.fast.answered.Load()
	}
	return in
}

// Run polls the directory every PollInterval and reloads on change until
// ctx ends. A rejected set is not retried until the content changes again.
func (e *Engine) Run(ctx context.Context) error {
	t := e.clock.NewTicker(e.opts.PollInterval)
	defer t.Stop()
	var last string
	for polls := 1; ; polls++ {
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
			// Stat first; read the content only when names, sizes or
			// times moved, and every fullReadPolls polls in case an edit
			// kept both size and time.
			fp, err := fingerprint(e.opts.Dir, e.opts.Bundle)
			if err != nil {
				e.log.Warn("policy poll", "err", err)
				continue
			}
			if fp == last && polls%fullReadPolls != 0 {
				continue
			}
			last = fp
			src, err := e.read()
			if err != nil {
				e.log.Warn("policy poll", "err", err)
				continue
			}
			e.mu.Lock()
			same := src.hash == e.tried
			e.mu.Unlock()
			if same {
				continue
			}
			_ = e.Reload(ctx) // reported through log and OnReload
		}
	}
}

// defaultSmokeInputs exercise a policy with nothing and with a typical
// request, so that a set that errors on ordinary traffic is never swapped in.
func defaultSmokeInputs() []ast.Value {
	sample := ast.MustParseTerm(`{
		"attributes": {
			"source": {"principal": "spiffe://cluster.local/ns/default/sa/client",
				"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 40000}}},
			"destination": {"principal": "spiffe://cluster.local/ns/default/sa/server",
				"address": {"socketAddress": {"address": "10.0.0.2", "portValue": 8080}}},
			"request": {"http": {"id": "1", "method": "GET", "path": "/", "host": "server",
				"protocol": "HTTP/1.1", "headers": {":method": "GET", ":path": "/", "user-agent": "writ-smoke"}}}
		},
		"parsed_path": [""], "parsed_query": {}, "parsed_body": null, "truncated_body": false,
		"version": {"encoding": "protojson", "ext_authz": "v3"}
	}`).Value
	return []ast.Value{ast.NewObject(), sample}
}

// noMetrics spares every evaluation the allocation of OPA's metrics, which
// nothing reads; it is stateless and shared.
var noMetrics = metrics.NoOp()

// DecisionPath is the reference every decision evaluates.
func (e *Engine) DecisionPath() ast.Ref { return e.path.Copy() }
