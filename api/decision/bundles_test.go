package decision_test

import (
	"context"
	"net/http"
	"strconv"
	"testing"

	"github.com/open-policy-agent/opa/v1/download"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/api/decision"
	"github.com/writmesh/writ/policy"
)

// bundleHandler serves testdata/policy as bundle "mesh" with an ETag, the
// way writd's bundle service does.
func bundleHandler(t *testing.T) http.Handler {
	t.Helper()
	b, err := policy.BuildBundle(context.Background(), "testdata/policy", decision.EngineOptions("testdata/policy", ""))
	if err != nil {
		t.Fatal(err)
	}
	etag := strconv.Quote(b.Hash[:32])
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("name") != "mesh" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("ETag", etag)
		if r.Header.Get("If-None-Match") == etag {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		w.Header().Set("Content-Type", "application/gzip")
		_, _ = w.Write(b.Data)
	})
}

// TestBundlesOverMTLS: OPA's own bundle downloader, with a client
// certificate (an SVID) as a stock OPA is configured, pulls the bundle
// from the decision API's listener and gets 304 for an unchanged one;
// callers the admin policy does not grant it get 403, and callers
// without credentials 401.
func TestBundlesOverMTLS(t *testing.T) {
	e := newEnv(t, envOptions{bundles: bundleHandler(t)})
	enforcerID := spiffeid.RequireFromString("spiffe://example.org/ns/writ-system/sa/writ-enforcer")
	ctx := context.Background()

	var got []download.Update
	d := download.New(download.Config{}, e.opaClient(enforcerID, ""), "bundles/mesh").
		WithCallback(func(_ context.Context, u download.Update) error { got = append(got, u); return nil })
	for range 2 {
		if err := d.Trigger(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if len(got) != 2 || got[0].Error != nil || got[0].Bundle == nil || len(got[0].Bundle.Modules) != 1 {
		t.Fatalf("first download: %+v", got)
	}
	if got[1].Error != nil || got[1].Bundle != nil || got[1].ETag != got[0].ETag {
		t.Fatalf("second download %+v: want not modified (etag %s)", got[1], got[0].ETag)
	}

	// Refused callers: the downloader reports OPA's HTTP error.
	for _, tc := range []struct {
		name   string
		id     spiffeid.ID
		status int
	}{
		{"a workload without a grant", appID, http.StatusForbidden},
		{"the policy admin, whose grant names other APIs", spiffeid.RequireFromString("spiffe://example.org/ns/ops/sa/admin"), http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var u download.Update
			d := download.New(download.Config{}, e.opaClient(tc.id, ""), "bundles/mesh").
				WithCallback(func(_ context.Context, x download.Update) error { u = x; return nil })
			_ = d.Trigger(ctx)
			herr, ok := u.Error.(download.HTTPError)
			if !ok || herr.StatusCode != tc.status {
				t.Fatalf("download error %v, want HTTP %d", u.Error, tc.status)
			}
		})
	}
	if r := e.do(e.mtls(enforcerID), "GET", "/bundles/other", "", ""); r.status != http.StatusForbidden {
		t.Fatalf("another bundle: %d, want 403", r.status)
	}
	recs := e.sink.records()
	if n := len(recs); n == 0 || recs[n-1].API != decision.APIBundles || recs[n-1].Result != decision.ResultForbidden {
		t.Fatalf("refusals are not audited: %+v", recs)
	}
	if r := e.do(e.client(nil), "GET", "/bundles/mesh", "", ""); r.status != http.StatusUnauthorized {
		t.Fatalf("no credentials: %d, want 401", r.status)
	}
}
