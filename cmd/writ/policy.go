package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/util"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/policy"
)

// The policy commands run locally, without writd: they read a policy
// directory (or bundle) and evaluate it in this process.
func init() {
	commands["policy test"] = (*cli).policyTest
	commands["policy eval"] = (*cli).policyEval
}

// maxInputBytes bounds the input file of `writ policy eval`.
const maxInputBytes = 16 << 20

// errTestsFailed makes `writ policy test` exit 1 like `opa test`.
var errTestsFailed = errors.New("tests failed")

// policyTest runs the Rego unit tests under each directory given.
func (c *cli) policyTest(ctx context.Context, args []string) error {
	fs := c.flags("policy test")
	verbose := fs.Bool("v", false, "list every test, with trace notes of failures")
	coverage := fs.Bool("coverage", false, "report coverage per file with the lines no test reached")
	fs.Usage = func() {
		fmt.Fprintln(c.stderr, "usage: writ policy test DIR... [-v] [--coverage]")
		fs.PrintDefaults()
	}
	dirs, err := parseWithArgs(fs, args)
	if err != nil {
		return err
	}
	opts := policy.TestOptions{Verbose: *verbose, Coverage: policy.CoverageSummary}
	if *coverage {
		opts.Coverage = policy.CoverageFiles
	}
	// Every directory is its own policy set: sets for different
	// deployments may define the same packages.
	var total, failures int
	for _, dir := range dirs {
		if len(dirs) > 1 {
			fmt.Fprintf(c.stdout, "== %s\n", dir)
		}
		passed, failed, err := policy.RunTestsWith(ctx, dir, c.stdout, opts)
		if err != nil {
			return err
		}
		if passed+failed == 0 {
			return fmt.Errorf("no tests found under %s", dir)
		}
		total += passed + failed
		failures += failed
	}
	if failures > 0 {
		return fmt.Errorf("%w: %d of %d", errTestsFailed, failures, total)
	}
	return nil
}

// parseWithArgs parses flags placed before or after the positional
// arguments, which `writ policy test DIR -v` users expect, and wants at
// least one of those.
func parseWithArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	rest := args
	for {
		if err := fs.Parse(rest); err != nil {
			return nil, errUsage
		}
		left := fs.Args()
		if len(left) == 0 {
			break
		}
		pos = append(pos, left[0])
		rest = left[1:]
	}
	if len(pos) == 0 {
		fs.Usage()
		return nil, errUsage
	}
	return pos, nil
}

// policyEval evaluates a policy on one input and prints the decision.
func (c *cli) policyEval(ctx context.Context, args []string) error {
	fs := c.flags("policy eval")
	dir := fs.String("policy", "", "policy directory or OPA bundle (.tar.gz) (required)")
	inputFile := fs.String("input", "", "input file: a policy input document or an Envoy CheckRequest in JSON; - for stdin (required)")
	decision := fs.String("decision", policy.DefaultDecisionPath, "the rule to evaluate")
	explain := fs.String("explain", "", "also print the evaluation trace: notes, fails or full")
	fs.Usage = func() {
		fmt.Fprintln(c.stderr, "usage: writ policy eval --policy DIR --input FILE [--decision PATH] [--explain notes|fails|full]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if *dir == "" || *inputFile == "" || fs.NArg() > 0 {
		fs.Usage()
		return errUsage
	}
	switch *explain {
	case "", policy.ExplainNotes, policy.ExplainFails, policy.ExplainFull:
	default:
		return fmt.Errorf("--explain %q: want notes, fails or full", *explain)
	}
	raw, err := readInput(*inputFile)
	if err != nil {
		return err
	}
	input, req, err := parseInput(raw)
	if err != nil {
		return err
	}
	opts := policy.Options{DecisionPath: *decision, CacheSize: -1}
	if st, err := os.Stat(*dir); err == nil && !st.IsDir() {
		opts.Bundle = *dir
	} else {
		opts.Dir = *dir
	}
	engine, err := policy.NewEngine(ctx, opts)
	if err != nil {
		return err
	}
	out := evalOutput{Decision: *decision, Revision: engine.Revision()}
	if req != nil {
		// What Check would answer, through the same enforcer writ-proxy
		// and writ-enforcer run.
		var got enforcer.Decision
		e, err := enforcer.New(enforcer.Options{Engine: engine, FullInput: true,
			Sink: enforcer.SinkFunc(func(_ context.Context, d enforcer.Decision) error { got = d; return nil })})
		if err != nil {
			return err
		}
		e.Check(ctx, req)
		out.Enforcer = &enforcerOutput{Result: got.Result, HTTPStatus: got.HTTPStatus, Reason: got.Reason, Path: got.Path, RawPath: got.RawPath}
		if input == nil {
			// Refused before policy (a bad path): nothing to evaluate.
			return c.printEval(out)
		}
	}
	var res policy.Result
	if *explain != "" {
		var trace bytes.Buffer
		res, err = engine.Explain(ctx, input, *explain, &trace)
		fmt.Fprintf(c.stdout, "# explain (%s)\n%s\n", *explain, trace.String())
	} else {
		res, err = engine.Eval(ctx, input)
	}
	if err != nil {
		return err
	}
	out.Defined = res.Defined
	if res.Defined {
		out.Result = res.Value
	}
	out.MatchedRules = res.Rules
	return c.printEval(out)
}

type evalOutput struct {
	Decision string `json:"decision"`
	Revision string `json:"revision"`
	Defined  bool   `json:"defined"`
	Result   any    `json:"result,omitempty"`
	// MatchedRules name the rules that produced the result (FILE:LINE
	// RULE), when the engine can tell.
	MatchedRules []string        `json:"matched_rules,omitempty"`
	Enforcer     *enforcerOutput `json:"enforcer,omitempty"`
}

// enforcerOutput is what the enforcer makes of a CheckRequest's decision.
type enforcerOutput struct {
	Result     string `json:"result"`
	HTTPStatus int    `json:"http_status"`
	Reason     string `json:"reason"`
	Path       string `json:"path,omitempty"`
	RawPath    string `json:"raw_path,omitempty"`
}

func (c *cli) printEval(out evalOutput) error {
	bs, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return fmt.Errorf("encode result: %w", err)
	}
	_, err = fmt.Fprintf(c.stdout, "%s\n", bs)
	return err
}

func readInput(name string) ([]byte, error) {
	var r io.Reader
	if name == "-" {
		r = os.Stdin
	} else {
		f, err := os.Open(name)
		if err != nil {
			return nil, fmt.Errorf("read input: %w", err)
		}
		defer f.Close()
		r = f
	}
	bs, err := io.ReadAll(io.LimitReader(r, maxInputBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read input: %w", err)
	}
	if len(bs) > maxInputBytes {
		return nil, fmt.Errorf("read input: larger than %d bytes", maxInputBytes)
	}
	return bs, nil
}

// parseInput tells a CheckRequest (a JSON object whose only key is
// "attributes" and which protojson accepts as one) from a policy input
// document (anything else, e.g. opa-envoy-plugin's input with its
// parsed_path). For a CheckRequest it returns the request and the input
// the enforcer builds from it, which is nil when the request is refused
// before policy.
func parseInput(raw []byte) (ast.Value, *authv3.CheckRequest, error) {
	var doc any
	if err := util.UnmarshalJSON(raw, &doc); err != nil {
		return nil, nil, fmt.Errorf("input: %w", err)
	}
	if m, ok := doc.(map[string]any); ok && len(m) == 1 && m["attributes"] != nil {
		req := &authv3.CheckRequest{}
		if err := protojson.Unmarshal(raw, req); err == nil {
			in, err := enforcer.Input(req, 0)
			if errors.Is(err, enforcer.ErrBadPath) {
				return nil, req, nil
			}
			if err != nil {
				return nil, nil, fmt.Errorf("input from check request: %w", err)
			}
			return in, req, nil
		}
	}
	v, err := ast.InterfaceToValue(doc)
	if err != nil {
		return nil, nil, fmt.Errorf("input: %w", err)
	}
	if _, ok := v.(ast.Object); !ok {
		return nil, nil, errors.New("input: want a JSON object")
	}
	return v, nil, nil
}
