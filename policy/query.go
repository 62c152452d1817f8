package policy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/topdown"
)

// maxPreparedPaths bounds the prepared queries a policy set keeps for
// EvalPath; callers choose the paths, so the set must not grow with them.
// Paths past the bound are prepared for each call.
const maxPreparedPaths = 256

// preparedPaths caches the prepared queries of EvalPath per path. It lives
// and dies with its policy set.
type preparedPaths struct {
	caps   *ast.Capabilities
	strict bool
	mu     sync.Mutex
	m      map[string]preparedPath
}

// preparedPath is a prepared query of EvalPath and the rules at its path.
type preparedPath struct {
	pq    rego.PreparedEvalQuery
	rules *ruleIndex
}

// ParseDataPath turns a slash-separated path under data, as OPA's REST data
// API takes it ("envoy/authz/allow"; "" for data itself), into a reference.
// Empty segments are skipped and percent-escapes decoded; a segment that is
// an integer indexes an array, as OPA does.
func ParseDataPath(p string) (ast.Ref, error) {
	ref := ast.Ref{ast.DefaultRootDocument}
	for seg := range strings.SplitSeq(p, "/") {
		if seg == "" {
			continue
		}
		if strings.ContainsAny(seg, "\"\x00") {
			return nil, fmt.Errorf("data path %q: invalid segment %q", p, seg)
		}
		if n, ok := atoi(seg); ok {
			ref = append(ref, ast.IntNumberTerm(n))
			continue
		}
		ref = append(ref, ast.StringTerm(seg))
	}
	return ref, nil
}

func atoi(s string) (int, bool) {
	if s == "" || len(s) > 9 || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	n := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// EvalPath evaluates the document at path (a ground reference under data,
// such as one from ParseDataPath) in this snapshot's policy set, with input
// (nil for none). It is the OPA data API's query: Defined is false when the
// document is undefined. It bypasses the decision cache, which is keyed for
// the decision path only. Safe for concurrent use.
func (s Snapshot) EvalPath(ctx context.Context, path ast.Ref, input ast.Value) (Result, error) {
	set := s.set
	res := Result{Revision: set.revision}
	if len(path) == 0 || !path[0].Equal(ast.DefaultRootDocument) || !path.IsGround() {
		return res, fmt.Errorf("evaluate %s: not a constant path under data", path)
	}
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("evaluate %s in policy %s: %w", path, set.revision, err)
	}
	if _, isObj := input.(ast.Object); isObj && path.Equal(set.path) {
		// The decision itself: the cache and fast path apply, and the
		// answer names its rules.
		return s.Eval(ctx, input)
	}
	pp, err := set.prepare(ctx, path)
	if err != nil {
		return res, err
	}
	c := topdown.NewCancel()
	stop := context.AfterFunc(ctx, c.Cancel)
	defer stop()
	opts := []rego.EvalOption{rego.EvalExternalCancel(c), rego.EvalMetrics(noMetrics)}
	if input != nil {
		opts = append(opts, rego.EvalParsedInput(input))
	}
	var tr *matchTracer
	if pp.rules.ambiguous {
		tr = &matchTracer{ix: pp.rules}
		opts = append(opts, rego.EvalQueryTracer(tr))
	}
	rs, err := pp.pq.Eval(ctx, opts...)
	if err != nil {
		return res, fmt.Errorf("evaluate %s in policy %s: %w", path, set.revision, err)
	}
	switch {
	case len(rs) == 0:
		return res, nil
	case len(rs) == 1 && len(rs[0].Expressions) == 1:
		res.Defined, res.Value = true, rs[0].Expressions[0].Value
		if tr != nil {
			res.Rules = tr.rules
		} else {
			res.Rules = pp.rules.fromValue(res.Value)
		}
		return res, nil
	default:
		return res, fmt.Errorf("evaluate %s in policy %s: %d results", path, set.revision, len(rs))
	}
}

func (s *compiledSet) prepare(ctx context.Context, path ast.Ref) (preparedPath, error) {
	key := path.String()
	p := &s.paths
	p.mu.Lock()
	defer p.mu.Unlock()
	if pp, ok := p.m[key]; ok {
		return pp, nil
	}
	if s.compiler == nil {
		return preparedPath{}, errors.New("policy set cannot evaluate other paths")
	}
	pq, err := rego.New(
		rego.ParsedQuery(ast.NewBody(ast.NewExpr(ast.NewTerm(path)))),
		rego.Compiler(s.compiler),
		rego.Store(s.store),
		rego.StoreReadAST(true),
		rego.Capabilities(p.caps),
		rego.StrictBuiltinErrors(p.strict),
	).PrepareForEval(ctx)
	if err != nil {
		return preparedPath{}, fmt.Errorf("prepare %s: %w", path, err)
	}
	ix := newRuleIndex(s.compiler, path)
	pp := preparedPath{pq: pq, rules: &ix}
	if p.m == nil {
		p.m = map[string]preparedPath{}
	}
	if len(p.m) < maxPreparedPaths {
		p.m[key] = pp
	}
	return pp, nil
}
