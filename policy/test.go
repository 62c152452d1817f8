package policy

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/cover"
	"github.com/open-policy-agent/opa/v1/tester"
)

// testTimeout bounds each Rego test, as `opa test` does.
const testTimeout = 5 * time.Second

// RunTests runs the Rego unit tests (rules named test_* in any module, by
// convention in *_test.rego files) under dir, with the same capabilities as
// the engine (no network builtins), and writes a report like `opa test -v`
// to w followed by a line-coverage summary. It returns the number of tests
// that passed and that failed or errored; err is for tests that could not
// be run at all (a parse or compile error, naming file and line).
func RunTests(ctx context.Context, dir string, w io.Writer, verbose bool) (passed, failed int, err error) {
	return RunTestsWith(ctx, dir, w, TestOptions{Verbose: verbose, Coverage: CoverageSummary})
}

// Coverage reporting levels of TestOptions.
const (
	CoverageNone    = 0 // no coverage lines
	CoverageSummary = 1 // one line for the whole set
	CoverageFiles   = 2 // the summary, then every file with its uncovered lines
)

// TestOptions tune RunTestsWith.
type TestOptions struct {
	// Verbose lists every test and its trace notes, like `opa test -v`.
	Verbose bool
	// Coverage is one of the Coverage constants.
	Coverage int
}

// RunTestsWith is RunTests with the report's detail chosen by opts. Safe
// for concurrent use: every call compiles its own copy.
func RunTestsWith(ctx context.Context, dir string, w io.Writer, opts TestOptions) (passed, failed int, err error) {
	verbose := opts.Verbose
	caps := capabilities(false)
	mods, store, err := tester.LoadWithParserOptions([]string{dir}, nil, ast.ParserOptions{
		RegoVersion:       ast.RegoV1,
		Capabilities:      caps,
		ProcessAnnotation: true,
	})
	if err != nil {
		return 0, 0, fmt.Errorf("load tests from %s: %w", dir, flattenErr(err))
	}
	cov := cover.New()
	compiler := ast.NewCompiler().
		WithCapabilities(caps).
		WithDefaultRegoVersion(ast.RegoV1).
		WithEnablePrintStatements(true)
	ch, err := tester.NewRunner().
		SetCompiler(compiler).
		SetStore(store).
		SetModules(mods).
		CapturePrintOutput(true).
		EnableTracing(verbose).
		SetCoverageRuns(nil).
		SetCoverageQueryTracer(cov).
		SetTimeout(testTimeout).
		SetParallel(1).
		RunTests(ctx, nil)
	if err != nil {
		if errs, ok := err.(ast.Errors); ok {
			err = joinASTErrors(errs)
		}
		return 0, 0, fmt.Errorf("run tests in %s: %w", dir, err)
	}
	// Count while the reporter prints: results flow through a second channel.
	fwd := make(chan *tester.Result)
	done := make(chan error, 1)
	go func() {
		done <- tester.PrettyReporter{Output: w, Verbose: verbose}.Report(fwd)
	}()
	for r := range ch {
		switch {
		case r.Skip:
		case r.Pass():
			passed++
		default:
			failed++
		}
		fwd <- r
	}
	close(fwd)
	if err := <-done; err != nil {
		return passed, failed, fmt.Errorf("report tests: %w", err)
	}
	if passed+failed > 0 && opts.Coverage > CoverageNone {
		rep := cov.Report(mods)
		fmt.Fprintf(w, "coverage: %.1f%% (%d of %d lines)\n", rep.Coverage,
			rep.CoveredLines, rep.CoveredLines+rep.NotCoveredLines)
		if opts.Coverage >= CoverageFiles {
			writeFileCoverage(w, rep)
		}
	}
	return passed, failed, nil
}

// writeFileCoverage lists each file's coverage and the line ranges no test
// reached, files in name order.
func writeFileCoverage(w io.Writer, rep cover.Report) {
	names := make([]string, 0, len(rep.Files))
	for n := range rep.Files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		f := rep.Files[n]
		fmt.Fprintf(w, "  %s: %.1f%% (%d of %d lines)", n, f.Coverage, f.CoveredLines, f.CoveredLines+f.NotCoveredLines)
		if len(f.NotCovered) > 0 {
			parts := make([]string, 0, len(f.NotCovered))
			for _, r := range f.NotCovered {
				if r.Start.Row == r.End.Row {
					parts = append(parts, strconv.Itoa(r.Start.Row))
				} else {
					parts = append(parts, fmt.Sprintf("%d-%d", r.Start.Row, r.End.Row))
				}
			}
			fmt.Fprintf(w, "; not covered: %s", strings.Join(parts, ", "))
		}
		fmt.Fprintln(w)
	}
}
