package policy

import (
	"context"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"
)

// corpusPolicy reads a few input fields, one of them through a header
// lookup by constant key, one through glob.match on the path, and echoes a
// number through sprintf so that 1 and 1.0 must not share a cache entry.
const corpusPolicy = `package envoy.authz

default allow := {"allowed": false, "http_status": 403}

allow := {"allowed": true, "headers": {"x-user": sprintf("%v/%v", [input.attributes.request.http.headers["x-user"], input.n])}} if {
	some rule in data.rbac.rules
	rule.principal == input.attributes.source.principal
	rule.method == input.attributes.request.http.method
	glob.match(rule.path, ["/"], input.attributes.request.http.path)
}
`

const corpusData = `{"rules": [
	{"principal": "spiffe://td/ns/a/sa/web", "method": "GET", "path": "/api/v1/users/*/orders/*"},
	{"principal": "spiffe://td/ns/a/sa/web", "method": "POST", "path": "/api/v1/users/*/orders"},
	{"principal": "spiffe://td/ns/b/sa/admin", "method": "GET", "path": "/admin/**"},
	{"principal": "spiffe://td/ns/b/sa/admin", "method": "DELETE", "path": "/api/v1/users/*"}
]}`

func corpusInput(r *rand.Rand, i int) ast.Value {
	principals := []string{"spiffe://td/ns/a/sa/web", "spiffe://td/ns/b/sa/admin", "spiffe://td/ns/c/sa/other", ""}
	methods := []string{"GET", "POST", "DELETE", "PUT"}
	id := func() string {
		if r.IntN(2) == 0 {
			return fmt.Sprint(r.IntN(4)) // a small pool, so entries repeat
		}
		return fmt.Sprintf("%016x", r.Uint64()) // high cardinality
	}
	var path string
	switch r.IntN(4) {
	case 0:
		path = "/api/v1/users/" + id() + "/orders/" + id()
	case 1:
		path = "/api/v1/users/" + id() + "/orders"
	case 2:
		path = "/admin/" + id() + "/" + id()
	default:
		path = "/api/v1/users/" + id()
	}
	headers := ast.NewObject(ast.Item(ast.StringTerm("x-request-id"), ast.StringTerm(fmt.Sprint(i))))
	if r.IntN(3) > 0 {
		headers.Insert(ast.StringTerm("x-user"), ast.StringTerm([]string{"alice", "bob"}[r.IntN(2)]))
	}
	http := ast.NewObject(
		ast.Item(ast.StringTerm("method"), ast.StringTerm(methods[r.IntN(len(methods))])),
		ast.Item(ast.StringTerm("path"), ast.StringTerm(path)),
		ast.Item(ast.StringTerm("headers"), ast.NewTerm(headers)),
	)
	attrs := ast.NewObject(
		ast.Item(ast.StringTerm("request"), ast.ObjectTerm(ast.Item(ast.StringTerm("http"), ast.NewTerm(http)))),
	)
	if p := principals[r.IntN(len(principals))]; p != "" {
		attrs.Insert(ast.StringTerm("source"), ast.ObjectTerm(ast.Item(ast.StringTerm("principal"), ast.StringTerm(p))))
	}
	in := ast.NewObject(ast.Item(ast.StringTerm("attributes"), ast.NewTerm(attrs)))
	switch r.IntN(4) {
	case 0:
		in.Insert(ast.StringTerm("n"), ast.NumberTerm("1"))
	case 1:
		in.Insert(ast.StringTerm("n"), ast.NumberTerm("1.0"))
	case 2:
		in.Insert(ast.StringTerm("n"), ast.StringTerm("1"))
	}
	return in
}

func TestCachedAndUncachedEnginesAgree(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": corpusPolicy, "rbac/data.json": corpusData})
	// The same policy plus a rule that reads input by a variable key, which
	// makes the cache key on the whole input.
	wholeDir := t.TempDir()
	writeFiles(t, wholeDir, map[string]string{"authz.rego": corpusPolicy + "\nkeys contains k if input[k]\n", "rbac/data.json": corpusData})
	ctx := context.Background()
	for _, tc := range []struct {
		dir  string
		size int
		keys []string
	}{
		{dir, 64, []string{"input.attributes.request.http.headers.x-user", "input.attributes.request.http.method",
			"input.attributes.request.http.path", "input.attributes.source.principal", "input.n"}},
		{dir, 100000, []string{"input.attributes.request.http.headers.x-user", "input.attributes.request.http.method",
			"input.attributes.request.http.path", "input.attributes.source.principal", "input.n"}},
		{wholeDir, 1000, nil},
	} {
		size := tc.size
		t.Run(fmt.Sprintf("size %d keys %d", size, len(tc.keys)), func(t *testing.T) {
			plain := newEngine(t, Options{Dir: tc.dir, CacheSize: -1})
			if plain.Info().CacheEnabled {
				t.Fatal("CacheSize -1 left the cache on")
			}
			cached := newEngine(t, Options{Dir: tc.dir, CacheSize: size})
			info := cached.Info()
			if !info.CacheEnabled || !sameSet(info.CacheKeyPaths, tc.keys) {
				t.Fatalf("info %+v, want key paths %v", info, tc.keys)
			}
			r := rand.New(rand.NewPCG(1, uint64(size)))
			hits, allowed := 0, 0
			const n = 5000
			for i := range n {
				in := corpusInput(r, i)
				want, err := plain.Eval(ctx, in)
				if err != nil {
					t.Fatal(err)
				}
				for range 2 {
					got, err := cached.Eval(ctx, in)
					if err != nil {
						t.Fatal(err)
					}
					if got.Cached {
						hits++
					}
					if got.Defined != want.Defined || !reflect.DeepEqual(got.Value, want.Value) {
						t.Fatalf("input %v: cached %+v, uncached %+v", in, got, want)
					}
				}
				if m, ok := want.Value.(map[string]any); ok && m["allowed"] == true {
					allowed++
				}
			}
			if hits < n || allowed == 0 || allowed == n {
				t.Fatalf("hits %d allowed %d of %d: the corpus does not exercise the cache", hits, allowed, n)
			}
			if e := cached.Info().CacheEntries; e > size {
				t.Fatalf("%d entries in a cache bounded to %d", e, size)
			}
		})
	}
}

func TestCacheKeysOnlyOnFieldsThePolicyReads(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": corpusPolicy, "rbac/data.json": corpusData})
	e := newEngine(t, Options{Dir: dir})
	ctx := context.Background()
	base := `{"attributes": {"source": {"principal": "spiffe://td/ns/a/sa/web"}, "request": {"http": {"method": "GET", "path": "/api/v1/users/7/orders/9", "headers": {"x-user": "%s", "x-request-id": "%s"}}}}, "n": 1}`
	tests := []struct {
		user, reqID string
		cached      bool
		header      string
	}{
		{"alice", "r1", false, "alice/1"},
		{"alice", "r2", true, "alice/1"},
		{"bob", "r3", false, "bob/1"},
		{"alice", "r4", true, "alice/1"},
	}
	for i, tt := range tests {
		got, err := e.Eval(ctx, input(t, fmt.Sprintf(base, tt.user, tt.reqID)))
		if err != nil {
			t.Fatal(err)
		}
		h := got.Value.(map[string]any)["headers"].(map[string]any)["x-user"]
		if got.Cached != tt.cached || h != tt.header {
			t.Fatalf("request %d: cached %v header %v, want %v %v", i, got.Cached, h, tt.cached, tt.header)
		}
	}
}

func TestCacheDroppedOnPolicyChange(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow := input.a == data.want\n", "data.json": `{"want": 1}`})
	e := newEngine(t, Options{Dir: dir})
	ctx := context.Background()
	in := input(t, `{"a": 1}`)
	for range 2 {
		if r, _ := e.Eval(ctx, in); r.Value != true {
			t.Fatalf("got %+v", r)
		}
	}
	writeFiles(t, dir, map[string]string{"data.json": `{"want": 2}`})
	if err := e.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if r, _ := e.Eval(ctx, in); r.Value != false || r.Cached {
		t.Fatalf("after a data change got %+v", r)
	}
}

func TestStrictEqual(t *testing.T) {
	tests := []struct {
		a, b string
		want bool
	}{
		{`1`, `1.0`, false},
		{`1`, `1`, true},
		{`"1"`, `1`, false},
		{`{"a": [1, {"b": null}]}`, `{"a": [1, {"b": null}]}`, true},
		{`{"a": 1, "b": 2}`, `{"b": 2, "a": 1}`, true},
		{`{"a": 1}`, `{"a": 1.0}`, false},
		{`[1, 2]`, `[2, 1]`, false},
		{`true`, `"true"`, false},
	}
	for _, tt := range tests {
		if got := strictEqual(input(t, tt.a), input(t, tt.b)); got != tt.want {
			t.Errorf("strictEqual(%s, %s) = %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
}

func TestCacheStepsAsideWhenItCannotHelp(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow := startswith(input.path, \"/a/\")\n"})
	e := newEngine(t, Options{Dir: dir})
	ctx := context.Background()
	same := input(t, `{"path": "/a/same"}`)
	for _, want := range []bool{false, true} {
		if r, _ := e.Eval(ctx, same); r.Cached != want {
			t.Fatalf("cached %v, want %v", r.Cached, want)
		}
	}
	for i := range cacheWindow {
		if _, err := e.Eval(ctx, input(t, fmt.Sprintf(`{"path": "/a/%d"}`, i))); err != nil {
			t.Fatal(err)
		}
	}
	if r, _ := e.Eval(ctx, same); r.Cached || r.Value != true {
		t.Fatalf("after a window of misses the cache still answers: %+v", r)
	}
}

func TestCacheRefusesLargeKeys(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"authz.rego": "package envoy.authz\n\nallow := startswith(input.path, \"/a/\")\n"})
	e := newEngine(t, Options{Dir: dir})
	big := input(t, fmt.Sprintf(`{"path": "/a/%0*d"}`, maxKeyBytes, 7))
	for range 2 {
		if r, _ := e.Eval(context.Background(), big); r.Cached || r.Value != true {
			t.Fatalf("large key: %+v", r)
		}
	}
	if n := e.Info().CacheEntries; n != 0 {
		t.Fatalf("%d entries after large keys only", n)
	}
}
