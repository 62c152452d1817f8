package policy

import (
	"context"
	"fmt"
	"io"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/topdown"
	"github.com/open-policy-agent/opa/v1/topdown/lineage"
)

// Explain modes, as `opa eval --explain` names them.
const (
	ExplainNotes = "notes" // only trace() notes and the rules leading to them
	ExplainFails = "fails" // expressions that failed
	ExplainFull  = "full"  // every evaluation step
)

// Explain evaluates the decision query on input like Eval, bypassing the
// cache, and writes a trace of the rules that produced the answer to w in
// OPA's pretty format with file:line locations. It serves
// `writ policy eval --explain`; it is far slower than Eval. Safe for
// concurrent use.
func (e *Engine) Explain(ctx context.Context, input ast.Value, mode string, w io.Writer) (Result, error) {
	set := e.cur.Load()
	buf := topdown.NewBufferTracer()
	res := Result{Revision: set.revision}
	rs, err := set.query.Eval(ctx, rego.EvalParsedInput(input), rego.EvalQueryTracer(buf))
	trace := []*topdown.Event(*buf)
	switch mode {
	case ExplainNotes:
		trace = lineage.Notes(trace)
	case ExplainFails:
		trace = lineage.Fails(trace)
	case ExplainFull, "":
		trace = lineage.Full(trace)
	default:
		return res, fmt.Errorf("explain: unknown mode %q (want notes, fails or full)", mode)
	}
	topdown.PrettyTraceWithLocation(w, trace)
	if err != nil {
		return res, fmt.Errorf("evaluate policy %s: %w", set.revision, err)
	}
	if len(rs) == 1 && len(rs[0].Expressions) == 1 {
		res.Defined, res.Value = true, rs[0].Expressions[0].Value
	}
	return res, nil
}
