package policy

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/open-policy-agent/opa/v1/ast"
)

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, body := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func input(t testing.TB, s string) ast.Value {
	t.Helper()
	v, err := ast.ParseTerm(s)
	if err != nil {
		t.Fatal(err)
	}
	return v.Value
}

const pairPolicy = `package envoy.authz

default allow := false

allow if {
	some pair in data.mesh.pairs
	pair.source == input.attributes.source.principal
	pair.destination == input.attributes.destination.principal
}
`

const pairData = `{"pairs": [{"source": "spiffe://td/ns/a/sa/x", "destination": "spiffe://td/ns/b/sa/y"}]}`

func newEngine(t *testing.T, opts Options) *Engine {
	t.Helper()
	e, err := NewEngine(context.Background(), opts)
	if err != nil {
		t.Fatalf("NewEngine: %v", err)
	}
	return e
}

func TestEngineEvaluatesPolicyWithData(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"authz.rego":          pairPolicy,
		"mesh/data.json":      pairData,
		"authz_test.rego":     "package envoy.authz_test\n\ntest_x if { true }\n",
		"other/settings.yaml": "level: 3\n",
		".git/ignored.rego":   "this is not rego",
		"notes.txt":           "ignored",
	})
	e := newEngine(t, Options{Dir: dir})
	ctx := context.Background()
	tests := []struct {
		name, in string
		want     any
	}{
		{"allowed pair", `{"attributes": {"source": {"principal": "spiffe://td/ns/a/sa/x"}, "destination": {"principal": "spiffe://td/ns/b/sa/y"}}}`, true},
		{"reversed pair", `{"attributes": {"source": {"principal": "spiffe://td/ns/b/sa/y"}, "destination": {"principal": "spiffe://td/ns/a/sa/x"}}}`, false},
		{"empty input", `{}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := e.Eval(ctx, input(t, tt.in))
			if err != nil {
				t.Fatal(err)
			}
			if !got.Defined || got.Value != tt.want {
				t.Fatalf("got %+v, want %v", got, tt.want)
			}
			if got.Revision != e.Revision() || !strings.HasPrefix(got.Revision, "sha256:") {
				t.Fatalf("revision %q, engine %q", got.Revision, e.Revision())
			}
		})
	}
}

func TestRevisionIsContentHashOrManifest(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	writeFiles(t, a, map[string]string{"authz.rego": pairPolicy, "mesh/data.json": pairData})
	writeFiles(t, b, map[string]string{"authz.rego": pairPolicy, "mesh/data.json": pairData})
	ea, eb := newEngine(t, Options{Dir: a}), newEngine(t, Options{Dir: b})
	if ea.Revision() != eb.Revision() {
		t.Fatalf("same content, revisions %q and %q", ea.Revision(), eb.Revision())
	}
	writeFiles(t, b, map[string]string{"mesh/data.json": `{"pairs": []}`})
	if err := eb.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ea.Revision() == eb.Revision() {
		t.Fatalf("different data, same revision %q", ea.Revision())
	}
	writeFiles(t, b, map[string]string{".manifest": `{"revision": "release-42"}`})
	if err := eb.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := eb.Revision(); got != "release-42" {
		t.Fatalf("revision %q, want the manifest's", got)
	}
}

func TestBadPolicyNeverReplacesRunningOne(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		wantErr []string
	}{
		{"parse error", map[string]string{"authz.rego": "package envoy.authz\n\nallow if {\n  input.x ==\n}\n"}, []string{"authz.rego:", "rego_parse_error"}},
		{"unsafe variable", map[string]string{"authz.rego": "package envoy.authz\n\nallow if {\n\tx == input.y\n}\n"}, []string{"authz.rego:4", "unsafe"}},
		{"network builtin removed", map[string]string{"authz.rego": "package envoy.authz\n\nallow if {\n\thttp.send({\"method\": \"GET\", \"url\": \"http://x\"}).status_code == 200\n}\n"}, []string{"authz.rego:4", "http.send"}},
		{"v0 syntax", map[string]string{"authz.rego": "package envoy.authz\n\nallow {\n\ttrue\n}\n"}, []string{"authz.rego:3"}},
		{"conflict at evaluation", map[string]string{"authz.rego": "package envoy.authz\n\nallow := true if input\nallow := false if input\n"}, []string{"smoke test", "conflict"}},
		{"decision path undefined", map[string]string{"authz.rego": "package other\n\nallow := true\n"}, []string{"data.envoy.authz.allow"}},
		{"bad data", map[string]string{"authz.rego": pairPolicy, "mesh/data.json": `{"pairs": [}`}, []string{"data.json"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, map[string]string{"authz.rego": pairPolicy, "mesh/data.json": pairData})
			var events []ReloadEvent
			e := newEngine(t, Options{Dir: dir, OnReload: func(ev ReloadEvent) { events = append(events, ev) }})
			good := e.Revision()
			writeFiles(t, dir, tt.files)
			err := e.Reload(context.Background())
			if err == nil {
				t.Fatal("bad policy accepted")
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if e.Revision() != good {
				t.Fatalf("revision changed to %q", e.Revision())
			}
			got, err := e.Eval(context.Background(), input(t, `{"attributes": {"source": {"principal": "spiffe://td/ns/a/sa/x"}, "destination": {"principal": "spiffe://td/ns/b/sa/y"}}}`))
			if err != nil || got.Value != true {
				t.Fatalf("running policy no longer answers: %+v %v", got, err)
			}
			if last := events[len(events)-1]; last.Err == nil || last.Revision != good {
				t.Fatalf("reload event %+v", last)
			}
			if e.LastError() == nil {
				t.Fatal("LastError is nil after a rejected reload")
			}
		})
	}
}

func TestNewEngineRejectsBadStart(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow if {\n"})
	if _, err := NewEngine(context.Background(), Options{Dir: dir}); err == nil {
		t.Fatal("engine started on a policy that does not parse")
	}
	if _, err := NewEngine(context.Background(), Options{Dir: t.TempDir()}); err == nil {
		t.Fatal("engine started on an empty directory")
	}
	if _, err := NewEngine(context.Background(), Options{Dir: dir, DecisionPath: "input.x"}); err == nil {
		t.Fatal("engine accepted a decision path outside data")
	}
}

func TestAllowNetworkKeepsHTTPSend(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow if {\n\tinput.go\n\thttp.send({\"method\": \"GET\", \"url\": \"http://127.0.0.1:1\"}).status_code == 200\n}\n"})
	e := newEngine(t, Options{Dir: dir, AllowNetwork: true, LenientBuiltinErrors: true})
	if in := e.Info(); in.Deterministic || in.CacheEnabled || in.NondeterministicBuiltin != "http.send" {
		t.Fatalf("info %+v: a policy calling http.send must not be cached", in)
	}
}

func TestHotReloadWithFakeClock(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow := input.a == 1\n"})
	clock := clockwork.NewFakeClock()
	events := make(chan ReloadEvent, 4)
	e := newEngine(t, Options{Dir: dir, Clock: clock, PollInterval: time.Second, OnReload: func(ev ReloadEvent) { events <- ev }})
	<-events // the initial load
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	in := input(t, `{"a": 1}`)
	eval := func() any {
		t.Helper()
		r, err := e.Eval(ctx, in)
		if err != nil {
			t.Fatal(err)
		}
		return r.Value
	}
	if got := eval(); got != true {
		t.Fatalf("initial decision %v", got)
	}
	tick := func() ReloadEvent {
		t.Helper()
		if err := clock.BlockUntilContext(ctx, 1); err != nil {
			t.Fatal(err)
		}
		clock.Advance(time.Second)
		select {
		case ev := <-events:
			return ev
		case <-time.After(30 * time.Second):
			t.Fatal("no reload after a change")
			return ReloadEvent{}
		}
	}
	first := e.Revision()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow := input.a == 2\n"})
	if ev := tick(); ev.Err != nil || ev.Revision == first {
		t.Fatalf("reload event %+v", ev)
	}
	if got := eval(); got != false {
		t.Fatalf("decision after reload %v (a stale cache entry?)", got)
	}
	second := e.Revision()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow := input.a ==\n"})
	if ev := tick(); ev.Err == nil || ev.Revision != second || !strings.Contains(ev.Err.Error(), "authz.rego:") {
		t.Fatalf("bad policy event %+v", ev)
	}
	if got := eval(); got != false || e.Revision() != second {
		t.Fatalf("bad policy changed the decision: %v, %s", got, e.Revision())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestRunTests(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"authz.rego":     pairPolicy,
		"mesh/data.json": pairData,
		"authz_test.rego": `package envoy.authz_test

import data.envoy.authz

test_pair_allowed if {
	authz.allow with input as {"attributes": {"source": {"principal": "spiffe://td/ns/a/sa/x"}, "destination": {"principal": "spiffe://td/ns/b/sa/y"}}}
}

test_wrong_expectation if {
	authz.allow with input as {}
}
`,
	})
	var out bytes.Buffer
	passed, failed, err := RunTests(context.Background(), dir, &out, true)
	if err != nil {
		t.Fatal(err)
	}
	if passed != 1 || failed != 1 {
		t.Fatalf("passed %d failed %d, want 1 and 1\n%s", passed, failed, out.String())
	}
	for _, want := range []string{"test_pair_allowed", "PASS", "test_wrong_expectation", "FAIL", "coverage:"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if _, _, err := RunTestsWith(context.Background(), dir, &out, TestOptions{Coverage: CoverageFiles}); err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^  .*authz\.rego: [0-9.]+% \(\d+ of \d+ lines\)`).MatchString(out.String()) {
		t.Errorf("per-file coverage lacks authz.rego:\n%s", out.String())
	}
	out.Reset()
	if _, _, err := RunTestsWith(context.Background(), dir, &out, TestOptions{}); err != nil || strings.Contains(out.String(), "coverage") {
		t.Errorf("coverage reported when not asked for (err %v):\n%s", err, out.String())
	}
	writeFiles(t, dir, map[string]string{"bad.rego": "package x\n\np if {\n"})
	if _, _, err := RunTests(context.Background(), dir, &out, false); err == nil || !strings.Contains(err.Error(), "bad.rego:") {
		t.Fatalf("err %v, want one naming bad.rego", err)
	}
}

func TestAnalysis(t *testing.T) {
	tests := []struct {
		name          string
		rego          string
		deterministic bool
		whole         bool
		paths         []string
	}{
		{"constant paths", "package p\n\nallow if {\n\tinput.a.b == \"x\"\n\tinput.a.b.c == 1\n\tinput.d[_] == 2\n}\n", true, false, []string{"a.b", "d"}},
		{"dynamic key", "package p\n\nallow if {\n\tsome k\n\tinput[k] == 1\n}\n", true, true, nil},
		{"input as value", "package p\n\nallow if {\n\tcount(input) > 1\n}\n", true, true, nil},
		{"input in a function", "package p\n\nf(x) := x.a\n\nallow if f(input.q) == 1\n", true, false, []string{"q"}},
		{"dynamic key from input", "package p\n\nallow if input.m[input.k] == 1\n", true, false, []string{"m", "k"}},
		{"clock", "package p\n\nallow if time.now_ns() > input.t\n", false, false, []string{"t"}},
		{"random", "package p\n\nallow if rand.intn(\"x\", 10) > input.t\n", false, false, []string{"t"}},
		{"uuid", "package p\n\nallow if uuid.rfc4122(\"x\") != input.t\n", false, false, []string{"t"}},
		{"jwt verify reads the clock", "package p\n\nallow if {\n\t[ok, _, _] := io.jwt.decode_verify(input.tok, {\"secret\": \"s\"})\n\tok\n}\n", false, false, []string{"tok"}},
		{"runtime", "package p\n\nallow if opa.runtime().env.X == input.x\n", false, false, []string{"x"}},
		{"with input", "package p\n\nq if input.a\n\nallow if q with input as {\"a\": true}\n", true, true, nil},
		{"no input", "package p\n\nallow := true\n", true, false, nil},
		{"cidr is deterministic", "package p\n\nallow if net.cidr_contains(\"10.0.0.0/8\", input.ip)\n", true, false, []string{"ip"}},
		{"dns is not", "package p\n\nallow if net.lookup_ip_addr(input.host)\n", false, false, []string{"host"}},
		{"import alias", "package p\n\nimport input.attributes.request.http as http_request\n\nallow if http_request.method == \"GET\"\n", true, false, []string{"attributes.request.http.method"}},
		{"rule holding a subtree", "package p\n\nhttp_request := input.attributes.request.http\n\nallow if http_request.method == \"GET\"\n", true, false, []string{"attributes.request.http"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mod := ast.MustParseModuleWithOpts(tt.rego, ast.ParserOptions{RegoVersion: ast.RegoV1})
			c := ast.NewCompiler().WithCapabilities(capabilities(true))
			c.Compile(map[string]*ast.Module{"p.rego": mod})
			if c.Failed() {
				t.Fatal(c.Errors)
			}
			a := analyse(c.Modules)
			if a.deterministic != tt.deterministic || a.wholeInput != tt.whole {
				t.Fatalf("deterministic %v whole %v, want %v %v", a.deterministic, a.wholeInput, tt.deterministic, tt.whole)
			}
			var got []string
			for _, p := range a.paths {
				got = append(got, strings.Join(p, "."))
			}
			if !tt.whole && !sameSet(got, tt.paths) {
				t.Fatalf("paths %v, want %v", got, tt.paths)
			}
		})
	}
}

func sameSet(a, b []string) bool {
	m := map[string]int{}
	for _, s := range a {
		m[s]++
	}
	for _, s := range b {
		m[s]--
	}
	for _, n := range m {
		if n != 0 {
			return false
		}
	}
	return true
}

func TestFingerprint(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow := input.a == 1\n", "notes.txt": "x"})
	p := filepath.Join(dir, "authz.rego")
	first, err := fingerprint(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	writeFiles(t, dir, map[string]string{"notes.txt": "not policy"})
	if fp, _ := fingerprint(dir, ""); fp != first {
		t.Fatal("a file that is not policy changed the fingerprint")
	}
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow := input.a == 2\n"})
	if fp, _ := fingerprint(dir, ""); fp == first {
		t.Fatal("an edit did not change the fingerprint")
	}
	// Same size, time put back: only the periodic full read sees this.
	if err := os.Chtimes(p, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	if fp, _ := fingerprint(dir, ""); fp != first {
		t.Fatal("fingerprint reads content")
	}
	writeFiles(t, dir, map[string]string{"more/data.json": "{}"})
	if fp, _ := fingerprint(dir, ""); fp == first {
		t.Fatal("a new data file did not change the fingerprint")
	}
}
