package policy

import (
	"fmt"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/topdown"
)

// ruleIndex names the rules that define the decision path, so that a
// result can say which of them produced it ("rbac.rego:12
// data.envoy.authz.allow"). Built once per policy set; read-only after.
type ruleIndex struct {
	labels map[*ast.Rule]string
	// byExpr maps the location of every expression in a decision rule's
	// body to the rule's label: partial evaluation keeps the locations of
	// the expressions it leaves, which ties a residual back to its rule.
	byExpr map[string]string
	// static, when set, finds the rule from the value alone: each value
	// the decision can take comes from exactly one rule (one rule, or a
	// rule and a default with different constant values).
	static map[string]string // value's String() -> label
	// one holds a shared one-element slice per label, so that answers
	// need not allocate one.
	one map[string][]string
	// ambiguous is true when only a trace of the evaluation can tell.
	ambiguous bool
}

func ruleLabel(r *ast.Rule) string {
	loc := "?"
	if r.Location != nil {
		loc = fmt.Sprintf("%s:%d", r.Location.File, r.Location.Row)
	}
	if r.Default {
		return loc + " default " + r.Path().String()
	}
	return loc + " " + r.Path().String()
}

func exprKey(l *ast.Location) string {
	if l == nil {
		return ""
	}
	return fmt.Sprintf("%s:%d:%d", l.File, l.Row, l.Col)
}

func newRuleIndex(compiler *ast.Compiler, path ast.Ref) ruleIndex {
	ix := ruleIndex{labels: map[*ast.Rule]string{}, byExpr: map[string]string{}, one: map[string][]string{}}
	// Only rules defining path itself: a query of a package would name
	// every rule in it.
	var rules []*ast.Rule
	for _, r := range compiler.GetRules(path) {
		if r.Path().Equal(path) {
			rules = append(rules, r)
		}
	}
	for _, r := range rules {
		l := ruleLabel(r)
		ix.labels[r] = l
		ix.one[l] = []string{l}
		ast.WalkExprs(r.Body, func(e *ast.Expr) bool {
			if k := exprKey(e.Location); k != "" {
				ix.byExpr[k] = l
			}
			return false
		})
	}
	// Constant heads whose values tell the rules apart need no trace.
	static := map[string]string{}
	for _, r := range rules {
		if len(r.Head.Args) > 0 || r.Else != nil || r.Head.Value == nil || !ast.IsConstant(r.Head.Value.Value) {
			static = nil
			break
		}
		k := r.Head.Value.Value.String()
		if _, dup := static[k]; dup {
			static = nil
			break
		}
		static[k] = ix.labels[r]
	}
	if static != nil {
		ix.static = static
	} else {
		ix.ambiguous = len(rules) > 0
	}
	return ix
}

// fromValue is the matched rule when the value (as Result.Value holds it)
// alone tells it, else nil.
func (ix *ruleIndex) fromValue(v any) []string {
	if ix.static == nil {
		return nil
	}
	var k string
	switch v := v.(type) {
	case bool:
		k = ast.Boolean(v).String()
	default:
		av, err := ast.InterfaceToValue(v)
		if err != nil {
			return nil
		}
		k = av.String()
	}
	if l, ok := ix.static[k]; ok {
		return ix.one[l]
	}
	return nil
}

// matchTracer records the decision rules whose bodies were satisfied, in
// order, without plugging variables: it sees rule exits only. Not safe for
// concurrent use; one per evaluation.
type matchTracer struct {
	ix    *ruleIndex
	rules []string
}

var _ topdown.QueryTracer = (*matchTracer)(nil)

func (t *matchTracer) Enabled() bool { return true }

func (t *matchTracer) Config() topdown.TraceConfig { return topdown.TraceConfig{} }

func (t *matchTracer) TraceEvent(ev topdown.Event) {
	if ev.Op != topdown.ExitOp {
		return
	}
	r, ok := ev.Node.(*ast.Rule)
	if !ok {
		return
	}
	l, ok := t.ix.labels[r]
	if !ok {
		return
	}
	for _, seen := range t.rules {
		if seen == l {
			return
		}
	}
	t.rules = append(t.rules, l)
}

// partialTracer finds, during a partial evaluation, a decision rule whose
// body held without leaving anything for the unknowns: the rule behind a
// residual that is always true.
type partialTracer struct {
	ix     *ruleIndex
	saves  int
	always string
}

var _ topdown.QueryTracer = (*partialTracer)(nil)

func (t *partialTracer) Enabled() bool { return true }

func (t *partialTracer) Config() topdown.TraceConfig { return topdown.TraceConfig{} }

func (t *partialTracer) TraceEvent(ev topdown.Event) {
	switch ev.Op {
	case topdown.SaveOp:
		t.saves++
	case topdown.EnterOp, topdown.RedoOp:
		if r, ok := ev.Node.(*ast.Rule); ok {
			if _, ok := t.ix.labels[r]; ok {
				t.saves = 0
			}
		}
	case topdown.ExitOp:
		if r, ok := ev.Node.(*ast.Rule); ok {
			if l, ok := t.ix.labels[r]; ok && t.saves == 0 && t.always == "" {
				t.always = l
			}
		}
	}
}

// conjRule is the decision rule a residual conjunction came from: the
// rule holding its expressions.
func (ix *ruleIndex) conjRule(body ast.Body) string {
	for _, e := range body {
		if l, ok := ix.byExpr[exprKey(e.Location)]; ok {
			return l
		}
	}
	return ""
}
