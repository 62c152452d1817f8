package enforcer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/uuid"
	"github.com/jonboulle/clockwork"
	"github.com/writmesh/writ/policy"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/protobuf/proto"
)

// recorder is an audit sink that keeps what it is given.
type recorder struct {
	got []Decision
	err error
}

func (r *recorder) Record(_ context.Context, d Decision) error {
	r.got = append(r.got, d)
	return r.err
}

func newEnforcer(t testing.TB, dir string, sink Sink, clock clockwork.Clock) *Enforcer {
	t.Helper()
	eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(Options{Engine: eng, Sink: sink, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func policyDir(t testing.TB, rego string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte(rego), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func simpleRequest(principal, method, path string, headers map[string]string) *authv3.CheckRequest {
	h := map[string]string{":method": method, ":path": path}
	for k, v := range headers {
		h[k] = v
	}
	return checkRequest(peer("10.0.0.1", 50000, principal), peer("10.0.0.2", 8080, serverID),
		&authv3.AttributeContext_HttpRequest{Method: method, Path: path, Host: "orders.shop", Protocol: "HTTP/2", Headers: h}, nil)
}

type want struct {
	allowed bool
	status  int
	headers map[string]string
	body    string
}

func checkResponse(t *testing.T, resp *authv3.CheckResponse, w want) {
	t.Helper()
	if w.allowed {
		ok := resp.GetOkResponse()
		if resp.GetStatus().GetCode() != int32(code.Code_OK) || ok == nil {
			t.Fatalf("response %v, want allow", resp)
		}
		for k, v := range w.headers {
			if got := headerIn(ok.GetHeaders(), k); got != v {
				t.Fatalf("upstream header %s = %q, want %q (%v)", k, got, v, resp)
			}
		}
		return
	}
	den := resp.GetDeniedResponse()
	if resp.GetStatus().GetCode() == int32(code.Code_OK) || den == nil {
		t.Fatalf("response %v, want deny", resp)
	}
	if got := int(den.GetStatus().GetCode()); got != w.status {
		t.Fatalf("denied with %d, want %d", got, w.status)
	}
	if den.GetBody() != w.body {
		t.Fatalf("body %q, want %q", den.GetBody(), w.body)
	}
	for k, v := range w.headers {
		if got := headerIn(den.GetHeaders(), k); got != v {
			t.Fatalf("denial header %s = %q, want %q", k, got, v)
		}
	}
}

func headerIn(hs []*corev3.HeaderValueOption, k string) string {
	for _, h := range hs {
		if h.GetHeader().GetKey() == k {
			return h.GetHeader().GetValue()
		}
	}
	return ""
}

func hs256(t testing.TB, secret string, claims string) string {
	t.Helper()
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + enc.EncodeToString([]byte(claims))
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(signing))
	return signing + "." + enc.EncodeToString(mac.Sum(nil))
}

// es256 signs claims with the test key whose public half is in
// policies/jwt/data.json.
func es256(t testing.TB, claims string) string {
	t.Helper()
	b := base64.RawURLEncoding
	num := func(s string) *big.Int {
		bs, err := b.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return new(big.Int).SetBytes(bs)
	}
	key := &ecdsa.PrivateKey{
		PublicKey: ecdsa.PublicKey{Curve: elliptic.P256(), X: num("7HgcubKreRIolDtUTmr3hDqxN_fk7eQDV738txe4Qqc"), Y: num("Tdke2bIOAfe6Gl6a-OaztnxDzU07exdqFvxGkYZA-3o")},
		D:         num("NqdC3Fr5ecMe7dFSszAU1DwuukQEjmbUtVIVNQPjYN0"),
	}
	signing := b.EncodeToString([]byte(`{"alg":"ES256","typ":"JWT","kid":"test-1"}`)) + "." + b.EncodeToString([]byte(claims))
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + b.EncodeToString(sig)
}

// TestShippedPolicies runs the shipped policies through Check with
// requests built as Envoy sends them, and their Rego unit tests.
func TestShippedPolicies(t *testing.T) {
	const other = "spiffe://cluster.local/ns/shop/sa/other"
	admin := "spiffe://cluster.local/ns/ops/sa/admin"
	secret := "example-secret-change-me"
	rita := "Bearer " + hs256(t, secret, `{"sub":"rita","roles":[],"exp":4102444800}`)
	ed := "Bearer " + hs256(t, secret, `{"sub":"ed","roles":["editor"],"exp":4102444800}`)
	forged := "Bearer " + hs256(t, "guess", `{"sub":"eve","roles":["admin"],"exp":4102444800}`)
	jsonBody := func(r *authv3.CheckRequest, body string) *authv3.CheckRequest {
		h := r.GetAttributes().GetRequest().GetHttp()
		h.Body = body
		h.Headers["content-type"] = "application/json"
		return r
	}
	reader := "Bearer " + es256(t, `{"iss":"https://id.example.com","aud":"orders","sub":"alice","scope":"orders:read","exp":4102444800}`)
	tests := []struct {
		dir  string
		name string
		req  *authv3.CheckRequest
		want want
	}{
		{"jwt", "scope reads", simpleRequest("", "GET", "/orders/7", map[string]string{"authorization": reader}), want{allowed: true, headers: map[string]string{"x-jwt-subject": "alice"}}},
		{"jwt", "scope cannot write", simpleRequest("", "PUT", "/orders/7", map[string]string{"authorization": reader}), want{status: 403}},
		{"jwt", "no token", simpleRequest("", "GET", "/orders/7", nil), want{status: 401, headers: map[string]string{"www-authenticate": "Bearer"}}},
		{"mesh", "listed pair", simpleRequest(clientID, "GET", "/anything", nil), want{allowed: true}},
		{"mesh", "unlisted pair", simpleRequest(other, "GET", "/anything", nil), want{status: 403}},
		{"mesh", "no mTLS identity", simpleRequest("", "GET", "/anything", nil), want{status: 403}},
		{"mesh", "recorded gRPC request", goldenRequests()["grpc_mtls"], want{allowed: true}},
		{"rbac", "read user", simpleRequest(clientID, "GET", "/api/v1/users/42?x=1", nil), want{allowed: true}},
		{"rbac", "write user", simpleRequest(clientID, "PUT", "/api/v1/users/42", nil), want{status: 403}},
		{"rbac", "dot segments cannot escape", simpleRequest(clientID, "GET", "/api/v1/users/42/../../../../admin/x", nil), want{status: 403}},
		{"rbac", "normalized before matching", simpleRequest(clientID, "GET", "//api/v1/%75sers/./42", nil), want{allowed: true}},
		{"rbac", "encoded slash refused", simpleRequest(admin, "GET", "/admin%2Fx", nil), want{status: 400}},
		{"rbac", "admin", simpleRequest(admin, "DELETE", "/admin/cache", nil), want{allowed: true}},
		{"envoy-example", "reader GET", simpleRequest("", "GET", "/books/1", map[string]string{"authorization": rita}), want{allowed: true, headers: map[string]string{"x-subject": "rita"}}},
		{"envoy-example", "no token", simpleRequest("", "GET", "/books/1", nil), want{status: 401, headers: map[string]string{"www-authenticate": "Bearer"}, body: "missing or invalid bearer token"}},
		{"envoy-example", "forged token", simpleRequest("", "GET", "/books/1", map[string]string{"authorization": forged}), want{status: 401, body: "missing or invalid bearer token"}},
		{"envoy-example", "reader POST", jsonBody(simpleRequest("", "POST", "/books", map[string]string{"authorization": rita}), `{"title":"Dune"}`), want{status: 403, body: "rita may not POST /books"}},
		{"envoy-example", "editor POST", jsonBody(simpleRequest("", "POST", "/books", map[string]string{"authorization": ed}), `{"title":"Dune"}`), want{allowed: true, headers: map[string]string{"x-subject": "ed"}}},
		{"envoy-example", "editor POST untitled", jsonBody(simpleRequest("", "POST", "/books", map[string]string{"authorization": ed}), `{"title":""}`), want{status: 403, body: "ed may not POST /books"}},
	}
	enforcers := map[string]*Enforcer{}
	rec := &recorder{}
	for _, tt := range tests {
		t.Run(tt.dir+" "+tt.name, func(t *testing.T) {
			e := enforcers[tt.dir]
			if e == nil {
				e = newEnforcer(t, filepath.Join("..", "policies", tt.dir), rec, clockwork.NewRealClock())
				enforcers[tt.dir] = e
			}
			resp, d := e.Check(context.Background(), tt.req)
			checkResponse(t, resp, tt.want)
			if (d.Result == ResultAllow) != tt.want.allowed {
				t.Fatalf("decision %+v", d)
			}
			if last := rec.got[len(rec.got)-1]; last.ID != d.ID {
				t.Fatalf("decision %s not recorded", d.ID)
			}
		})
	}
	t.Run("rego unit tests", func(t *testing.T) {
		for _, dir := range []string{"mesh", "rbac", "envoy-example", "jwt", "authzen-todo"} {
			var out strings.Builder
			passed, failed, err := policy.RunTests(context.Background(), filepath.Join("..", "policies", dir), &out, false)
			if err != nil || failed != 0 || passed == 0 {
				t.Fatalf("%s: passed %d failed %d err %v\n%s", dir, passed, failed, err, out.String())
			}
		}
	})
}

func TestCheckFailsClosed(t *testing.T) {
	tests := []struct {
		name, rego string
		path       string
		status     int
		reason     string
	}{
		{"undefined", "package envoy.authz\n\nallow if input.nothing\n", "/", 403, "undefined"},
		{"not boolean", "package envoy.authz\n\nallow := \"yes\"\n", "/", 403, "want boolean or object"},
		{"allowed missing", "package envoy.authz\n\nallow := {\"headers\": {}}\n", "/", 403, `no "allowed"`},
		{"allowed not boolean", "package envoy.authz\n\nallow := {\"allowed\": \"true\"}\n", "/", 403, `"allowed" is string`},
		{"bad status", "package envoy.authz\n\nallow := {\"allowed\": false, \"http_status\": 999}\n", "/", 403, "http_status"},
		{"bad header value", "package envoy.authz\n\nallow := {\"allowed\": true, \"headers\": {\"x\": 1}}\n", "/", 403, `header "x"`},
		{"bad headers to remove", "package envoy.authz\n\nallow := {\"allowed\": true, \"request_headers_to_remove\": \"x\"}\n", "/", 403, "request_headers_to_remove"},
		{"bad metadata", "package envoy.authz\n\nallow := {\"allowed\": true, \"dynamic_metadata\": [1]}\n", "/", 403, "dynamic_metadata"},
		{"conflict on this request", "package envoy.authz\n\nallow := true if input.parsed_path[0] == \"x\"\n\nallow := false if input.parsed_path[0] == \"x\"\n", "/x", 403, "policy error"},
		{"builtin error", "package envoy.authz\n\nallow if to_number(input.parsed_path[1]) > 1\n", "/a/abc", 403, "policy error"},
		{"bad path before policy", "package envoy.authz\n\nallow := true\n", "/a/%2e%2e%2fetc", 400, "encoded slash"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := &recorder{}
			e := newEnforcer(t, policyDir(t, tt.rego), rec, clockwork.NewRealClock())
			resp, d := e.Check(context.Background(), simpleRequest(clientID, "GET", tt.path, nil))
			checkResponse(t, resp, want{status: tt.status})
			if d.Result != ResultDeny || d.HTTPStatus != tt.status || !strings.Contains(d.Reason, tt.reason) {
				t.Fatalf("decision %+v, want deny %d with reason containing %q", d, tt.status, tt.reason)
			}
			if len(rec.got) != 1 || rec.got[0].Reason != d.Reason || d.PolicyRevision != e.engine.Revision() {
				t.Fatalf("recorded %+v", rec.got)
			}
		})
	}
}

func TestSinkErrorDenies(t *testing.T) {
	rec := &recorder{err: errors.New("spool full")}
	e := newEnforcer(t, policyDir(t, "package envoy.authz\n\nallow := true\n"), rec, clockwork.NewRealClock())
	resp, d := e.Check(context.Background(), simpleRequest(clientID, "GET", "/", nil))
	checkResponse(t, resp, want{status: http.StatusServiceUnavailable})
	if resp.GetStatus().GetCode() != int32(code.Code_UNAVAILABLE) || d.Result != ResultDeny ||
		!strings.Contains(d.Reason, "spool full") || !strings.Contains(d.Reason, "was allow") {
		t.Fatalf("response %v decision %+v", resp, d)
	}
	if len(rec.got) != 1 || rec.got[0].Result != ResultAllow {
		t.Fatalf("the sink was not offered the original decision: %+v", rec.got)
	}
}

func TestDecisionRecord(t *testing.T) {
	clock := clockwork.NewFakeClockAt(time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC))
	rec := &recorder{}
	e := newEnforcer(t, filepath.Join("..", "policies", "rbac"), rec, clock)
	req := goldenRequests()["http2_mtls_normalized"]
	before := proto.Clone(req)
	_, d := e.Check(context.Background(), req)
	id, err := uuid.Parse(d.ID)
	if err != nil || id.Version() != 7 {
		t.Fatalf("decision id %q is not a UUIDv7: %v", d.ID, err)
	}
	if !d.Time.Equal(clock.Now()) || d.Source != clientID || d.Destination != serverID || d.Method != "GET" ||
		d.Path != "/admin/~root/report%3Fv1" || d.RawPath != "/public/%2e%2e//admin/./%7Eroot/report%3Fv1?id=7" ||
		d.Protocol != "HTTP/2" || d.GRPC || d.TraceID != "4bf92f3577b34da6a3ce929d0e0e4736" ||
		d.PolicyRevision != e.engine.Revision() || d.Result != ResultDeny || d.Reason != "policy denied" || d.HTTPStatus != 403 {
		t.Fatalf("decision %+v", d)
	}
	if !proto.Equal(before, req) {
		t.Fatal("Check modified the request")
	}
	_, d2 := e.Check(context.Background(), req)
	if d2.ID == d.ID || !d2.Cached {
		t.Fatalf("second decision %+v: want a new id, answered from the cache", d2)
	}
}

func TestNewNeedsEngineAndSink(t *testing.T) {
	eng, err := policy.NewEngine(context.Background(), policy.Options{Dir: policyDir(t, "package envoy.authz\n\nallow := true\n")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(Options{Engine: eng}); err == nil {
		t.Fatal("enforcer without an audit sink")
	}
	if _, err := New(Options{Sink: &recorder{}}); err == nil {
		t.Fatal("enforcer without an engine")
	}
}

func TestCheckEmptyAndCancelled(t *testing.T) {
	rec := &recorder{}
	e := newEnforcer(t, policyDir(t, "package envoy.authz\n\nallow := true\n"), rec, clockwork.NewRealClock())
	for _, req := range []*authv3.CheckRequest{nil, {}, {Attributes: &authv3.AttributeContext{}}} {
		if resp, d := e.Check(context.Background(), req); d.Result != ResultDeny || d.Cause != CauseBadPath || resp.GetDeniedResponse() == nil {
			t.Fatalf("request %v: %+v", req, d)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, d := e.Check(ctx, simpleRequest(clientID, "GET", "/", nil)); d.Result != ResultDeny || d.Cause != CausePolicyError {
		t.Fatalf("cancelled context: %+v", d)
	}
}
