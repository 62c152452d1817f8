package proxy

import (
	"net/http"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkRouteMatch: the route lookup of one request, by the kind of
// route that matches it (matchConfig: earlier routes are tried first).
func BenchmarkRouteMatch(b *testing.B) {
	p := filepath.Join(b.TempDir(), "proxy.yaml")
	if err := os.WriteFile(p, []byte(matchConfig), 0o600); err != nil {
		b.Fatal(err)
	}
	c, err := LoadConfig(p)
	if err != nil {
		b.Fatal(err)
	}
	st := &state{routes: map[string]*RouteConfig{"r": &c.Routes[0]}}
	h := http.Header{"X-Id": {"abc"}, "X-Env": {"eu-prod"}, "X-Tier": {"gold"}}
	for _, bm := range []struct{ name, method, path string }{
		{"exact", "GET", "/items"},
		{"regex", "GET", "/items/12345"},
		{"method", "POST", "/items/x"},
		{"headers", "GET", "/h"},
		{"last", "GET", "/zzz"},
	} {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if st.route("r", "orders:80", bm.method, bm.path, h) == nil {
					b.Fatal("no route")
				}
			}
		})
	}
}
