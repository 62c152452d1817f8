package enforcer

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/writmesh/writ/policy"
)

// TestBadPolicyUnderLoadChangesNothing pushes broken policies while
// requests are being decided, then a good one: no request may see a
// different answer until the good policy is in, and none fails.
func TestBadPolicyUnderLoadChangesNothing(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("package envoy.authz\n\nallow if input.attributes.request.http.method == \"GET\"\n")
	eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	var recorded atomic.Int64
	e, err := New(Options{Engine: eng, Sink: SinkFunc(func(context.Context, Decision) error { recorded.Add(1); return nil })})
	if err != nil {
		t.Fatal(err)
	}
	good := eng.Revision()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var wrong, checks atomic.Int64
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			get := simpleRequest(clientID, "GET", "/x", nil)
			post := simpleRequest(clientID, "POST", "/x", nil)
			for i := 0; ctx.Err() == nil; i++ {
				req, want := get, ResultAllow
				if (i+w)%2 == 1 {
					req, want = post, ResultDeny
				}
				_, d := e.Check(context.Background(), req)
				checks.Add(1)
				if d.Result != want || d.PolicyRevision != good {
					wrong.Add(1)
				}
			}
		}()
	}
	bad := []string{
		"package envoy.authz\n\nallow if {\n",                                      // parse error
		"package envoy.authz\n\nallow if x == input.y\n",                           // unsafe variable
		"package envoy.authz\n\nallow := true if input\nallow := false if input\n", // conflict on every input
		"package envoy.authz\n\nallow if http.send({\"url\": \"http://x\", \"method\": \"GET\"})\n",
	}
	for round := range 25 {
		write(bad[round%len(bad)])
		if err := eng.Reload(context.Background()); err == nil {
			t.Errorf("bad policy %d accepted", round%len(bad))
		}
	}
	cancel()
	wg.Wait()
	if wrong.Load() != 0 || checks.Load() == 0 || recorded.Load() != checks.Load() {
		t.Fatalf("%d of %d decisions changed by bad policies; %d recorded", wrong.Load(), checks.Load(), recorded.Load())
	}
	write("package envoy.authz\n\nallow if input.attributes.request.http.method == \"POST\"\n")
	if err := eng.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, d := e.Check(context.Background(), simpleRequest(clientID, "POST", "/x", nil)); d.Result != ResultAllow || d.PolicyRevision == good {
		t.Fatalf("good policy not in force: %+v", d)
	}
}
