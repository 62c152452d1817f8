package policy

import (
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"unicode/utf8"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage"
	"github.com/open-policy-agent/opa/v1/topdown"
)

// residualBuiltins are the builtins a residual may call per request. They
// are pure functions of their operands that need nothing from the
// evaluation context, so calling OPA's own implementation directly gives
// exactly OPA's answer.
var residualBuiltins = map[string]bool{
	"glob.match": true,
	"startswith": true,
	"endswith":   true,
	"contains":   true,
	"equal":      true,
	"neq":        true,
}

// residuals is the fast path of a deterministic boolean policy whose
// high-cardinality inputs (a request path with ids in it) are only ever
// tested by simple builtins: the policy is partially evaluated once per
// combination of the other inputs it reads (principal, method, ...),
// leaving the few builtin calls that depend on the path, and each request
// then runs just those calls. With a 50-rule RBAC policy that is one glob
// match instead of a full evaluation.
//
// Anything it does not understand (support rules, negation, other
// builtins, a missing or non-string value, a builtin error) falls back to
// the full evaluation, which is always right. Safe for concurrent use.
type residuals struct {
	query      ast.Body
	unknown    [][]string
	unknownKey [][]*ast.Term // unknown as key terms
	unknownRef []*ast.Term
	hasDefault bool
	rules      *ruleIndex
	// defaultRules names the default rule, for answers that fell to it.
	defaultRules []string
	compiler     *ast.Compiler
	store        storage.Store
	caps         *ast.Capabilities
	strict       bool
	// cache maps the values of the other input paths to a *residual (or
	// nil for "no fast path for this combination"), in Result.Value.
	cache *decisionCache
	// answered counts decisions the fast path gave, for tests and Info.
	answered atomic.Uint64
	// lookups and misses bound the partial evaluations (far dearer than
	// a full one) to maxResidualMisses per cacheWindow lookups, so that
	// inputs whose known part never repeats cost little extra.
	lookups, misses atomic.Uint64
}

// maxResidualMisses is how many partial evaluations one window of
// cacheWindow lookups may start.
const maxResidualMisses = 64

// residual is the partially evaluated decision for one combination of the
// known inputs: true when any conjunction of predicates holds, else the
// default.
type residual struct {
	always bool
	conj   [][]pred
	// rules name the decision rule behind always and behind each
	// conjunction (nil where not known).
	alwaysRules []string
	conjRules   [][]string
}

// pred is one builtin call whose only non-constant operand is an unknown
// input path.
type pred struct {
	// glob, when set, answers a glob.match whose pattern and delimiters
	// are constant and simple, instead of fn.
	glob    *simpleGlob
	fn      topdown.BuiltinFunc
	args    []*ast.Term // constants, with the unknown's slot left nil
	slot    int
	unknown int
}

// newResiduals decides whether the set qualifies for the fast path and
// prepares it; nil when it does not.
func newResiduals(compiler *ast.Compiler, store storage.Store, path ast.Ref, an analysis, caps *ast.Capabilities, strict bool, size int, ix *ruleIndex) *residuals {
	if !an.deterministic || an.wholeInput || size <= 0 {
		return nil
	}
	// The decision must be a boolean complete rule: rules with the
	// constant value true, and at most a default of false.
	rules := compiler.GetRules(path)
	if len(rules) == 0 {
		return nil
	}
	hasDefault := false
	var defaultRules []string
	for _, r := range rules {
		if !r.Path().Equal(path) {
			return nil
		}
		if len(r.Head.Args) > 0 || r.Else != nil || r.Head.Value == nil {
			return nil
		}
		if r.Default {
			if !r.Head.Value.Equal(ast.InternedTerm(false)) {
				return nil
			}
			hasDefault = true
			defaultRules = ix.one[ix.labels[r]]
			continue
		}
		if !r.Head.Value.Equal(ast.InternedTerm(true)) {
			return nil
		}
	}
	unknown := residualUnknowns(compiler.Modules, an.paths)
	if len(unknown) == 0 {
		return nil
	}
	var known [][]string
	for _, p := range an.paths {
		if !slices.ContainsFunc(unknown, func(u []string) bool { return slices.Equal(u, p) }) {
			known = append(known, p)
		}
	}
	if known == nil {
		known = [][]string{}
	}
	refs := make([]*ast.Term, len(unknown))
	for i, u := range unknown {
		r := ast.Ref{ast.InputRootDocument}
		for _, s := range u {
			r = append(r, ast.StringTerm(s))
		}
		refs[i] = ast.NewTerm(r)
	}
	return &residuals{
		query:        ast.NewBody(ast.Equality.Expr(ast.NewTerm(path), ast.InternedTerm(true))),
		unknown:      unknown,
		unknownKey:   pathTerms(unknown),
		unknownRef:   refs,
		hasDefault:   hasDefault,
		rules:        ix,
		defaultRules: defaultRules,
		compiler:     compiler,
		store:        store,
		caps:         caps,
		strict:       strict,
		cache:        newDecisionCache(known, size),
	}
}

// residualUnknowns are the input paths (among paths) that the modules
// read only as whole operands of residual builtins, never otherwise, and
// in no modules using `with`.
func residualUnknowns(mods map[string]*ast.Module, paths [][]string) [][]string {
	inBuiltin := map[string]int{}
	anyUse := map[string]int{}
	usesWith := false
	key := func(r ast.Ref) (string, bool) {
		if len(r) < 2 || !r[0].Equal(ast.InputRootDocument) {
			return "", false
		}
		parts := make([]string, 0, len(r)-1)
		for _, t := range r[1:] {
			s, ok := t.Value.(ast.String)
			if !ok {
				return "", false
			}
			parts = append(parts, string(s))
		}
		return strings.Join(parts, "\x00"), true
	}
	var dynamic []ast.Ref
	vis := ast.NewGenericVisitor(func(x any) bool {
		switch x := x.(type) {
		case *ast.With:
			usesWith = true
		case *ast.Expr:
			if x.IsCall() && residualBuiltins[x.Operator().String()] {
				ops := x.Operands()
				for _, o := range ops {
					if r, ok := o.Value.(ast.Ref); ok {
						if k, ok := key(r); ok {
							inBuiltin[k]++
						}
					}
				}
			}
		case ast.Ref:
			if len(x) > 0 && x[0].Equal(ast.InputRootDocument) {
				if k, ok := key(x); ok {
					anyUse[k]++
				} else {
					dynamic = append(dynamic, x)
				}
			}
		}
		return false
	})
	for _, m := range mods {
		for _, r := range m.Rules {
			vis.Walk(r)
			localCopies(r, key, inBuiltin)
		}
	}
	if usesWith {
		return nil
	}
	var out [][]string
	for _, p := range paths {
		k := strings.Join(p, "\x00")
		if anyUse[k] == 0 || anyUse[k] != inBuiltin[k] {
			continue
		}
		// Nothing may read below or through p any other way.
		clean := true
		for other, n := range anyUse {
			if n > 0 && other != k && strings.HasPrefix(other, k+"\x00") {
				clean = false
			}
		}
		for _, d := range dynamic {
			if prefixOfRef(p, d) || refPrefixOf(d, p) {
				clean = false
			}
		}
		if clean {
			out = append(out, p)
		}
	}
	return out
}

// localCopies counts, as uses by a residual builtin, the copies the
// compiler makes of call operands (__local0__ = input.path;
// glob.match(p, d, __local0__)) when the local is used by residual
// builtins and nowhere else in the rule.
func localCopies(r *ast.Rule, key func(ast.Ref) (string, bool), inBuiltin map[string]int) {
	copies := map[ast.Var]string{}
	for _, e := range r.Body {
		if !e.IsEquality() || len(e.Operands()) != 2 {
			continue
		}
		a, b := e.Operands()[0], e.Operands()[1]
		if _, ok := a.Value.(ast.Var); ok {
			a, b = b, a
		}
		v, ok := b.Value.(ast.Var)
		if !ok {
			continue
		}
		if ref, ok := a.Value.(ast.Ref); ok {
			if k, ok := key(ref); ok {
				copies[v] = k
			}
		}
	}
	if len(copies) == 0 {
		return
	}
	total := map[ast.Var]int{}
	byBuiltin := map[ast.Var]int{}
	ast.WalkVars(r, func(v ast.Var) bool {
		if _, ok := copies[v]; ok {
			total[v]++
		}
		return false
	})
	ast.WalkExprs(r, func(e *ast.Expr) bool {
		if e.IsCall() && residualBuiltins[e.Operator().String()] {
			for _, o := range e.Operands() {
				if v, ok := o.Value.(ast.Var); ok {
					if _, ok := copies[v]; ok {
						byBuiltin[v]++
					}
				}
			}
		}
		return false
	})
	for v, k := range copies {
		if byBuiltin[v] > 0 && total[v] == byBuiltin[v]+1 {
			inBuiltin[k]++
		}
	}
}

// prefixOfRef reports whether path p is a prefix of input ref r's constant
// head.
func prefixOfRef(p []string, r ast.Ref) bool {
	for i, s := range p {
		if i+1 >= len(r) {
			return true
		}
		v, ok := r[i+1].Value.(ast.String)
		if !ok {
			return true // a dynamic part at or above p may reach it
		}
		if string(v) != s {
			return false
		}
	}
	return true
}

// refPrefixOf reports whether the constant head of input ref r is a
// prefix of p.
func refPrefixOf(r ast.Ref, p []string) bool {
	for i := 1; i < len(r); i++ {
		v, ok := r[i].Value.(ast.String)
		if !ok {
			return true
		}
		if i-1 >= len(p) || p[i-1] != string(v) {
			return false
		}
	}
	return true
}

// eval answers from the residual for input's known values, computing it
// on first sight. ok is false when the caller must evaluate in full.
func (f *residuals) eval(ctx context.Context, input ast.Value, revision string) (Result, bool) {
	if !f.cache.use() {
		return Result{}, false
	}
	var vals [4]*ast.Term
	if len(f.unknown) > len(vals) {
		return Result{}, false
	}
	for i, p := range f.unknownKey {
		t := lookup(input, p)
		if t == nil {
			return Result{}, false
		}
		if _, ok := t.Value.(ast.String); !ok {
			return Result{}, false
		}
		vals[i] = t
	}
	key, sum, size := f.cache.key(input)
	if size > maxKeyBytes {
		return Result{}, false
	}
	if n := f.lookups.Add(1); n%cacheWindow == 0 {
		f.misses.Store(0)
	}
	var res *residual
	if r, ok := f.cache.get(key, sum); ok {
		res, _ = r.Value.(*residual)
	} else {
		if f.misses.Add(1) > maxResidualMisses {
			return Result{}, false
		}
		res = f.partial(ctx, input)
		if ctx.Err() != nil {
			// A cancelled partial evaluation says nothing about the
			// policy: do not remember it.
			return Result{}, false
		}
		f.cache.put(key, sum, Result{Value: res})
	}
	if res == nil {
		return Result{}, false
	}
	return f.answer(ctx, res, vals[:len(f.unknown)], revision)
}

// answer runs res's predicates on the unknown paths' values.
func (f *residuals) answer(ctx context.Context, res *residual, vals []*ast.Term, revision string) (Result, bool) {
	if res.always {
		f.answered.Add(1)
		return Result{Defined: true, Value: true, Revision: revision, Rules: res.alwaysRules}, true
	}
	bctx := topdown.BuiltinContext{Context: ctx}
	var ops [8]*ast.Term
	for ci, c := range res.conj {
		all := true
		for _, p := range c {
			if p.glob != nil {
				if s := string(vals[p.unknown].Value.(ast.String)); utf8.ValidString(s) {
					if !p.glob.match(s) {
						all = false
						break
					}
					continue
				}
			}
			args := ops[:len(p.args)]
			copy(args, p.args)
			args[p.slot] = vals[p.unknown]
			var out *ast.Term
			if err := p.fn(bctx, args, func(t *ast.Term) error { out = t; return nil }); err != nil {
				return Result{}, false
			}
			if out == nil {
				all = false
				break
			}
			if b, ok := out.Value.(ast.Boolean); ok && !bool(b) {
				all = false
				break
			}
		}
		if all {
			f.answered.Add(1)
			return Result{Defined: true, Value: true, Revision: revision, Rules: res.conjRules[ci]}, true
		}
	}
	f.answered.Add(1)
	if f.hasDefault {
		return Result{Defined: true, Value: false, Revision: revision, Rules: f.defaultRules}, true
	}
	return Result{Revision: revision}, true
}

// lookup follows a constant path through nested objects.
func lookup(v ast.Value, p []*ast.Term) *ast.Term {
	var t *ast.Term
	for _, k := range p {
		obj, ok := v.(ast.Object)
		if !ok {
			return nil
		}
		if t = obj.Get(k); t == nil {
			return nil
		}
		v = t.Value
	}
	return t
}

// partial evaluates the decision with the unknown paths left open and
// turns the result into predicates; nil if its shape is not understood.
func (f *residuals) partial(ctx context.Context, input ast.Value) *residual {
	tr := &partialTracer{ix: f.rules}
	pq, err := rego.New(
		rego.QueryTracer(tr),
		rego.ParsedQuery(f.query),
		rego.Compiler(f.compiler),
		rego.Store(f.store),
		rego.StoreReadAST(true),
		rego.ParsedInput(input),
		rego.ParsedUnknowns(f.unknownRef),
		rego.Capabilities(f.caps),
		rego.StrictBuiltinErrors(f.strict),
	).Partial(ctx)
	if err != nil || len(pq.Support) > 0 {
		return nil
	}
	res := &residual{}
	for _, body := range pq.Queries {
		if len(body) == 0 {
			res.always = true
			if tr.always != "" {
				res.alwaysRules = f.rules.one[tr.always]
			}
			return res
		}
		var c []pred
		for _, expr := range body {
			p, ok := f.predicate(expr)
			if !ok {
				return nil
			}
			c = append(c, p)
		}
		res.conj = append(res.conj, c)
		var rules []string
		if l := f.rules.conjRule(body); l != "" {
			rules = f.rules.one[l]
		}
		res.conjRules = append(res.conjRules, rules)
	}
	return res
}

// predicate accepts `builtin(const..., unknown, const...)` as a statement.
func (f *residuals) predicate(expr *ast.Expr) (pred, bool) {
	if expr.Negated || len(expr.With) > 0 || !expr.IsCall() {
		return pred{}, false
	}
	name := expr.Operator().String()
	b, ok := ast.BuiltinMap[name]
	if !ok || !residualBuiltins[name] {
		return pred{}, false
	}
	ops := expr.Operands()
	if b.Decl.FuncArgs().Variadic != nil || len(ops) != len(b.Decl.FuncArgs().Args) || len(ops) > 8 {
		return pred{}, false // an output operand, or a wrong arity
	}
	fn := topdown.GetBuiltin(name)
	if fn == nil {
		return pred{}, false
	}
	p := pred{fn: fn, args: make([]*ast.Term, len(ops)), slot: -1}
	for i, o := range ops {
		if u := slices.IndexFunc(f.unknownRef, func(r *ast.Term) bool { return r.Equal(o) }); u >= 0 {
			if p.slot >= 0 {
				return pred{}, false
			}
			p.slot, p.unknown = i, u
			continue
		}
		if !o.IsGround() {
			return pred{}, false
		}
		if _, isRef := o.Value.(ast.Ref); isRef {
			return pred{}, false
		}
		p.args[i] = o
	}
	if p.slot < 0 {
		return pred{}, false
	}
	if name == "glob.match" && p.slot == 2 {
		p.glob = compileSimpleGlob(p.args[0], p.args[1])
	}
	return p, true
}
