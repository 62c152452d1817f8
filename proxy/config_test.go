package proxy

import (
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "proxy.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

const goodConfig = `
clusters:
- name: orders
  lb_policy: LEAST_REQUEST
  connect_timeout: 2s
  endpoints: [{address: "127.0.0.1:15006"}, {address: "127.0.0.1:15007"}]
  peer_ids: [spiffe://example.org/ns/shop/sa/orders]
- name: orders-v2
  endpoints: [{address: "127.0.0.1:15008"}]
  peer_ids: [spiffe://example.org/ns/shop/sa/orders]
routes:
- name: orders
  virtual_hosts:
  - name: orders
    domains: ["*"]
    routes:
    - prefix: /
      headers: [{name: x-canary, exact: "yes"}]
      clusters: [{name: orders-v2, weight: 1}]
    - prefix: /
      timeout: 3s
      clusters: [{name: orders, weight: 90}, {name: orders-v2, weight: 10}]
      retry: {retry_on: [5xx, connect-failure], num_retries: 2, per_try_timeout: 500ms}
outbound:
- {name: orders, address: "127.0.0.1:9001", protocol: http, route: orders}
`

func TestLoadConfig(t *testing.T) {
	c, err := LoadConfig(writeFile(t, goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Routes[0].VirtualHosts[0].Routes[1]
	if got, want := time.Duration(r.Retry.PerTryTimeout), 500*time.Millisecond; got != want {
		t.Errorf("per_try_timeout = %v, want %v", got, want)
	}
	if got, want := time.Duration(c.Clusters[0].ConnectTimeout), 2*time.Second; got != want {
		t.Errorf("connect_timeout = %v, want %v", got, want)
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct {
		name, body, want string
	}{
		{"unknown key", goodConfig + "bogus: 1\n", "field bogus not found"},
		{"two documents", goodConfig + "---\n{}\n", "more than one document"},
		{"bad lb", strings.Replace(goodConfig, "LEAST_REQUEST", "RANDOM", 1), `lb_policy "RANDOM"`},
		{"no peer ids", strings.Replace(goodConfig, "  peer_ids: [spiffe://example.org/ns/shop/sa/orders]\n- name: orders-v2", "- name: orders-v2", 1), "peer_ids: at least one"},
		{"unknown cluster", strings.Replace(goodConfig, "{name: orders-v2, weight: 10}", "{name: nope, weight: 10}", 1), `unknown cluster "nope"`},
		{"unknown route", strings.Replace(goodConfig, "route: orders}", "route: nope}", 1), `unknown route "nope"`},
		{"bad retry_on", strings.Replace(goodConfig, "[5xx, connect-failure]", "[sometimes]", 1), `retry_on "sometimes"`},
		{"bad duration", strings.Replace(goodConfig, "3s", "soon", 1), "soon"},
		{"outbound off loopback", strings.Replace(goodConfig, `"127.0.0.1:9001"`, `"0.0.0.0:9001"`, 1), "must bind a loopback address"},
		{"bad endpoint", strings.Replace(goodConfig, `"127.0.0.1:15008"`, `"nohost"`, 1), `endpoint "nohost"`},
		{"request body too large", goodConfig + fmt.Sprintf("inbound:\n- {name: mesh, address: \"127.0.0.1:15006\", service: orders, app: \"127.0.0.1:8080\", request_body: %s}\n", "{max_request_bytes: 4194305}"), "request_body: max_request_bytes 4194305: want 1 to 4194304"},
		{"request body without a size", goodConfig + fmt.Sprintf("inbound:\n- {name: mesh, address: \"127.0.0.1:15006\", service: orders, app: \"127.0.0.1:8080\", request_body: %s}\n", "{allow_partial_message: true}"), "request_body: max_request_bytes 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadConfig(writeFile(t, tt.body))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestRouteMatch(t *testing.T) {
	c, err := LoadConfig(writeFile(t, goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	c.AddHTTPProxy("127.0.0.1:0")
	st := &state{routes: map[string]*RouteConfig{}}
	for i := range c.Routes {
		st.routes[c.Routes[i].Name] = &c.Routes[i]
	}
	tests := []struct {
		name, route, host, path string
		header                  http.Header
		want                    string // first cluster, "" for no route
	}{
		{"header route", "orders", "orders", "/x", http.Header{"X-Canary": {"yes"}}, "orders-v2"},
		{"header route, other value", "orders", "orders", "/x", http.Header{"X-Canary": {"no"}}, "orders"},
		{"wildcard", "orders", "anything:80", "/x", nil, "orders"},
		{"proxy by host", "http_proxy", "orders-v2", "/x", nil, "orders-v2"},
		{"proxy host with port", "http_proxy", "orders:80", "/", nil, "orders"},
		{"proxy unknown host", "http_proxy", "payments", "/", nil, ""},
		{"unknown route config", "nope", "orders", "/", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := st.route(tt.route, tt.host, "GET", tt.path, tt.header)
			got := ""
			if r != nil {
				got = r.Clusters[0].Name
			}
			if got != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}

const matchConfig = `
clusters:
- {name: exact, endpoints: [{address: "127.0.0.1:1"}], peer_ids: [spiffe://example.org/a]}
- {name: regex, endpoints: [{address: "127.0.0.1:1"}], peer_ids: [spiffe://example.org/a]}
- {name: post, endpoints: [{address: "127.0.0.1:1"}], peer_ids: [spiffe://example.org/a]}
- {name: hdr, endpoints: [{address: "127.0.0.1:1"}], peer_ids: [spiffe://example.org/a]}
- {name: absent, endpoints: [{address: "127.0.0.1:1"}], peer_ids: [spiffe://example.org/a]}
- {name: authority, endpoints: [{address: "127.0.0.1:1"}], peer_ids: [spiffe://example.org/a]}
- {name: rest, endpoints: [{address: "127.0.0.1:1"}], peer_ids: [spiffe://example.org/a]}
routes:
- name: r
  virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
    - {path: /items, clusters: [{name: exact, weight: 1}]}
    - {regex: "/items/[0-9]+", clusters: [{name: regex, weight: 1}]}
    - prefix: /items
      headers: [{name: ":method", exact: POST}]
      clusters: [{name: post, weight: 1}]
    - prefix: /h
      headers: [{name: x-id, regex: "[a-f]{2,4}"}, {name: x-env, suffix: "-PROD", ignore_case: true}, {name: x-tier, contains: gold}]
      clusters: [{name: hdr, weight: 1}]
    - prefix: /h
      headers: [{name: x-debug, invert: true}]
      clusters: [{name: absent, weight: 1}]
    - prefix: /
      headers: [{name: ":authority", prefix: "orders:"}]
      clusters: [{name: authority, weight: 1}]
    - {prefix: /, clusters: [{name: rest, weight: 1}]}
`

// TestRouteMatchKinds: exact, regex, method and header matches, tried in
// order with the first match winning, as in Envoy.
func TestRouteMatchKinds(t *testing.T) {
	c, err := LoadConfig(writeFile(t, matchConfig))
	if err != nil {
		t.Fatal(err)
	}
	st := &state{routes: map[string]*RouteConfig{"r": &c.Routes[0]}}
	hdr := func(kv ...string) http.Header {
		h := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			h.Add(kv[i], kv[i+1])
		}
		return h
	}
	tests := []struct {
		name, host, method, path string
		header                   http.Header
		want                     string
	}{
		{"exact path", "o", "GET", "/items", nil, "exact"},
		{"exact path wins over method", "o", "POST", "/items", nil, "exact"},
		{"exact is not a prefix", "o", "GET", "/items/", nil, "rest"},
		{"regex", "o", "GET", "/items/42", nil, "regex"},
		{"regex is anchored at the end", "o", "GET", "/items/42/x", nil, "rest"},
		{"regex is anchored at the start", "o", "GET", "/v1/items/42", nil, "rest"},
		{"regex wins over method", "o", "POST", "/items/42", nil, "regex"},
		{"method", "o", "POST", "/items/x", nil, "post"},
		{"other method", "o", "PUT", "/items/x", nil, "rest"},
		{"headers all match", "o", "GET", "/h", hdr("x-id", "abc", "x-env", "eu-prod", "x-tier", "the-gold-one"), "hdr"},
		{"header regex must match whole value", "o", "GET", "/h", hdr("x-id", "abcdefg", "x-env", "eu-prod", "x-tier", "gold"), "absent"},
		{"header suffix case", "o", "GET", "/h", hdr("x-id", "ab", "x-env", "EU-Prod", "x-tier", "gold"), "hdr"},
		{"header missing", "o", "GET", "/h", hdr("x-id", "ab", "x-tier", "gold"), "absent"},
		{"multiple values joined", "o", "GET", "/h", hdr("x-id", "ab", "x-env", "a", "x-env", "b-prod", "x-tier", "gold"), "hdr"},
		{"absent header present", "o", "GET", "/h", hdr("x-debug", "1"), "rest"},
		{"authority with port", "orders:80", "GET", "/z", nil, "authority"},
		{"authority without port", "orders", "GET", "/z", nil, "rest"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := st.route("r", tt.host, tt.method, tt.path, tt.header)
			if r == nil {
				t.Fatalf("no route, want %q", tt.want)
			}
			if got := r.Clusters[0].Name; got != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestRouteMatchErrors(t *testing.T) {
	base := strings.Replace(matchConfig, "    - {prefix: /, clusters: [{name: rest, weight: 1}]}\n", "", 1)
	tests := []struct{ name, route, want string }{
		{"two path kinds", "    - {prefix: /, path: /a, clusters: [{name: rest, weight: 1}]}\n", "exactly one of prefix, path and regex"},
		{"no path", "    - {clusters: [{name: rest, weight: 1}]}\n", "exactly one of prefix, path and regex"},
		{"relative path", "    - {path: a, clusters: [{name: rest, weight: 1}]}\n", "must start with /"},
		{"bad regex", "    - {regex: \"([\", clusters: [{name: rest, weight: 1}]}\n", "missing closing"},
		{"huge regex", "    - {regex: \"" + strings.Repeat("a", 1025) + "\", clusters: [{name: rest, weight: 1}]}\n", "more than 1024"},
		{"big program", "    - {regex: \"[a-z]{1000}[0-9]{1000}[a-z]{1000}[0-9]{1000}[a-z]{1000}\", clusters: [{name: rest, weight: 1}]}\n", "instructions"},
		{"bad header regex", "    - {prefix: /, headers: [{name: x, regex: \"(\"}], clusters: [{name: rest, weight: 1}]}\n", "header \"x\""},
		{"two header kinds", "    - {prefix: /, headers: [{name: x, exact: a, prefix: b}], clusters: [{name: rest, weight: 1}]}\n", "at most one of"},
		{"path pseudo-header", "    - {prefix: /, headers: [{name: \":path\", exact: /}], clusters: [{name: rest, weight: 1}]}\n", ":method or :authority"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadConfig(writeFile(t, base+tt.route))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// TestUnvalidatedRegexMatchesNothing: a route whose regex was never
// compiled (a Config not passed through Validate) fails closed.
func TestUnvalidatedRegexMatchesNothing(t *testing.T) {
	r := &Route{Regex: ".*"}
	h := &HeaderMatch{Name: "x", Regex: ".*"}
	if r.matchPath("/a") || h.matches("GET", "o", http.Header{"X": {"a"}}) {
		t.Fatal("an uncompiled regex matched")
	}
}

// TestWeightedSplit: a 90/10 split sends about 90 % to the first cluster.
func TestWeightedSplit(t *testing.T) {
	r := &Route{Clusters: []WeightedCluster{{Name: "v1", Weight: 90}, {Name: "v2", Weight: 10}}}
	n := map[string]int{}
	for range 20000 {
		n[pickCluster(r)]++
	}
	if v2 := n["v2"]; v2 < 1600 || v2 > 2400 {
		t.Fatalf("v2 got %d of 20000, want about 2000", v2)
	}
}

func TestLoadBalancing(t *testing.T) {
	eps := []*endpoint{{addr: "a"}, {addr: "b"}, {addr: "c"}}
	rr := &cluster{cfg: Cluster{LBPolicy: RoundRobin}, eps: eps}
	seen := map[string]int{}
	for range 30 {
		seen[rr.pick(nil, 0).addr]++
	}
	for _, e := range eps {
		if seen[e.addr] != 10 {
			t.Errorf("round robin: %s got %d of 30, want 10", e.addr, seen[e.addr])
		}
	}
	if next := eps[(rr.rr.Load()+1)%3]; rr.pick(next, 0) == next {
		t.Errorf("round robin picked the endpoint it was told to avoid")
	}
	// Least request: the busy endpoint is chosen only when it is one of
	// two picks and the other is busier, which never happens here.
	eps[1].active.Store(100)
	lr := &cluster{cfg: Cluster{LBPolicy: LeastRequest}, eps: eps}
	for range 1000 {
		if lr.pick(nil, 0) == eps[1] {
			t.Fatal("least request picked the busy endpoint")
		}
	}
	// Retries avoid the endpoint that failed when there is another.
	for range 100 {
		if lr.pick(eps[0], 0) == eps[0] {
			t.Fatal("least request picked the endpoint to avoid")
		}
	}
}

func TestBackoff(t *testing.T) {
	rp := &RetryPolicy{BaseInterval: Duration(10 * time.Millisecond), MaxInterval: Duration(40 * time.Millisecond)}
	for try, ceiling := range map[int]time.Duration{1: 10 * time.Millisecond, 2: 20 * time.Millisecond, 3: 40 * time.Millisecond, 9: 40 * time.Millisecond} {
		for range 200 {
			if d := backoff(rp, try); d <= 0 || d > ceiling {
				t.Fatalf("try %d: backoff %v, want in (0, %v]", try, d, ceiling)
			}
		}
	}
}

func TestTraceparent(t *testing.T) {
	h := map[string][]string{}
	id := ensureTrace(h, true, nil)
	tp := h["Traceparent"][0]
	if got, ok := validTraceparent(tp); !ok || got != id {
		t.Fatalf("new traceparent %q (id %q) invalid", tp, id)
	}
	h2 := map[string][]string{"Traceparent": {tp}}
	if id2 := ensureTrace(h2, true, nil); id2 != id || h2["Traceparent"][0][36:52] == tp[36:52] {
		t.Fatalf("outbound hop kept trace %q (want %q) and span %q (want new)", id2, id, h2["Traceparent"][0])
	}
	for _, bad := range []string{"", "00-00000000000000000000000000000000-0000000000000001-01", "00-zz", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"} {
		if _, ok := validTraceparent(bad); ok {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestRingHash: a key always maps to the same endpoint; keys spread over
// all endpoints; an ejected endpoint's keys move and the rest stay.
func TestRingHash(t *testing.T) {
	eps := []*endpoint{{addr: "10.0.0.1:1"}, {addr: "10.0.0.2:1"}, {addr: "10.0.0.3:1"}}
	c := &cluster{cfg: Cluster{LBPolicy: RingHash}, eps: eps, ring: buildRing(eps)}
	owner := map[string]*endpoint{}
	count := map[*endpoint]int{}
	for i := range 3000 {
		k := fmt.Sprint("user-", i)
		e := c.pickHash(hashKey(k), nil, 0)
		if again := c.pickHash(hashKey(k), nil, 0); again != e {
			t.Fatalf("key %s moved from %s to %s", k, e.addr, again.addr)
		}
		owner[k] = e
		count[e]++
	}
	for _, e := range eps {
		if count[e] < 600 {
			t.Errorf("%s got %d of 3000 keys", e.addr, count[e])
		}
	}
	eps[0].ejectedUntil.Store(100)
	c.ejected.Store(1)
	for k, e := range owner {
		got := c.pickHash(hashKey(k), nil, 50)
		if e != eps[0] && got != e {
			t.Fatalf("key %s of a healthy endpoint moved", k)
		}
		if got == eps[0] {
			t.Fatalf("key %s went to the ejected endpoint", k)
		}
	}
}

// TestRingHashShortKeys: keys and endpoints that differ only in their
// last characters (user ids, loopback ports) still spread over the ring.
func TestRingHashShortKeys(t *testing.T) {
	eps := []*endpoint{{addr: "127.0.0.1:41001"}, {addr: "127.0.0.1:41002"}}
	c := &cluster{cfg: Cluster{LBPolicy: RingHash}, eps: eps, ring: buildRing(eps)}
	few := map[*endpoint]int{}
	for i := range 20 {
		few[c.pickHash(hashKey(fmt.Sprint("user-", i)), nil, 0)]++
	}
	if len(few) != 2 {
		t.Errorf("20 keys user-0..user-19 all went to one endpoint")
	}
	count := map[*endpoint]int{}
	for i := range 1000 {
		count[c.pickHash(hashKey(fmt.Sprint("u", i)), nil, 0)]++
	}
	for _, e := range eps {
		if count[e] < 300 {
			t.Errorf("%s got %d of 1000 keys, want at least 300", e.addr, count[e])
		}
	}
}

func TestRetryCap(t *testing.T) {
	c := &cluster{maxRetry: 3}
	if got := c.retryCap(); got != 3 {
		t.Errorf("default: %d, want 3", got)
	}
	c.cfg.CircuitBreakers = &CircuitBreakers{RetryBudgetPercent: 20, MinRetryConcurrency: 2}
	c.inflight.Store(100)
	if got := c.retryCap(); got != 20 {
		t.Errorf("20%% of 100 in flight: %d, want 20", got)
	}
	c.inflight.Store(5)
	if got := c.retryCap(); got != 2 {
		t.Errorf("budget below the minimum: %d, want 2", got)
	}
}

func TestServiceAddr(t *testing.T) {
	tests := []struct {
		in, want string // want "" = not a service IP address
	}{
		{"127.0.0.5:80", "127.0.0.5:80"},
		{"[::ffff:127.0.0.5]:80", "127.0.0.5:80"},
		{"[fd00::10]:8080", "[fd00::10]:8080"},
		{"[FD00:0::10]:8080", "[fd00::10]:8080"},
		{"[fe80::1%eth0]:443", "[fe80::1]:443"},
		{"orders:80", ""},
		{"[fd00::10]:http", ""},
		{"fd00::10:80", ""},
	}
	for _, tt := range tests {
		ap, ok := serviceAddr(tt.in)
		got := ""
		if ok {
			got = ap.String()
		}
		if got != tt.want {
			t.Errorf("serviceAddr(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	// What originalDst reports for an IPv4 connection on an IPv6 socket,
	// and for a link-local destination, finds the configured address.
	if got, want := serviceKey(netip.MustParseAddrPort("[::ffff:127.0.0.5]:80")), netip.MustParseAddrPort("127.0.0.5:80"); got != want {
		t.Errorf("serviceKey = %v, want %v", got, want)
	}
	if got, want := serviceKey(netip.MustParseAddrPort("[fe80::1%3]:443")), netip.MustParseAddrPort("[fe80::1]:443"); got != want {
		t.Errorf("serviceKey = %v, want %v", got, want)
	}
}

func TestTransparentConfigIPv6(t *testing.T) {
	tests := []struct {
		name   string
		listen string
		addrs  [][]string // per cluster
		want   string     // "" = valid
	}{
		{"ipv6 loopback listener", "[::1]:15001", [][]string{{"[fd00::10]:80"}, {"127.0.0.5:80"}}, ""},
		{"ipv6 wildcard listener", "[::]:15001", [][]string{{"[fd00::10]:80"}}, "must bind a loopback address"},
		{"same address twice", "[::1]:15001", [][]string{{"[fd00::10]:80"}, {"[FD00::10]:80"}}, `address "[FD00::10]:80" is also cluster "c0"'s`},
		{"mapped and ipv4 forms", "127.0.0.1:15001", [][]string{{"127.0.0.5:80"}, {"[::ffff:127.0.0.5]:80"}}, `is also cluster "c0"'s`},
		{"named port on an IP", "[::1]:15001", [][]string{{"[fd00::10]:http"}}, "want IP:port with a numeric port"},
		{"host name", "[::1]:15001", [][]string{{"orders:80"}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := &Config{Outbound: []Outbound{{Name: "capture", Address: tt.listen, Protocol: "transparent"}}}
			for i, a := range tt.addrs {
				cfg.Clusters = append(cfg.Clusters, Cluster{Name: fmt.Sprintf("c%d", i), Addresses: a, Endpoints: []Endpoint{{Address: "127.0.0.1:15006"}}, PeerIDs: []string{"spiffe://example.org/ns/shop/sa/orders"}})
			}
			err := cfg.Validate()
			if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("got %v, want %q", err, tt.want)
			}
		})
	}
}
