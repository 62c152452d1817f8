package proxy

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"testing/iotest"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestRetryStatus: which answers each retry condition retries.
func TestRetryStatus(t *testing.T) {
	resp := func(status int, grpcStatus string) *http.Response {
		r := &http.Response{StatusCode: status, Header: http.Header{}}
		if grpcStatus != "" {
			r.Header.Set("Grpc-Status", grpcStatus)
		}
		return r
	}
	for _, c := range []struct {
		name string
		on   []string
		resp *http.Response
		want bool
	}{
		{"5xx on 500", []string{"5xx"}, resp(500, ""), true},
		{"5xx on 200", []string{"5xx"}, resp(200, ""), false},
		{"gateway-error on 503", []string{"gateway-error"}, resp(503, ""), true},
		{"gateway-error on 500", []string{"gateway-error"}, resp(500, ""), false},
		{"retriable-4xx on 409", []string{"retriable-4xx"}, resp(409, ""), true},
		{"retriable-4xx on 404", []string{"retriable-4xx"}, resp(404, ""), false},
		{"unavailable on grpc-status 14", []string{"unavailable"}, resp(200, "14"), true},
		{"unavailable on grpc-status 13", []string{"unavailable"}, resp(200, "13"), false},
		{"internal on grpc-status 13", []string{"cancelled", "internal"}, resp(200, "13"), true},
		{"resource-exhausted on grpc-status 8", []string{"resource-exhausted"}, resp(200, "8"), true},
		{"deadline-exceeded on grpc-status 4", []string{"deadline-exceeded"}, resp(200, "4"), true},
		{"unavailable on an OK call", []string{"unavailable"}, resp(200, "0"), false},
		{"unavailable without grpc-status", []string{"unavailable"}, resp(200, ""), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := retryStatus(&RetryPolicy{RetryOn: c.on}, c.resp); got != c.want {
				t.Errorf("retryStatus(%v) = %v, want %v", c.on, got, c.want)
			}
		})
	}
}

// TestRetryOnFromEnvoy: the gRPC retry conditions writd sets for gRPC
// routes (unavailable by default) translate instead of being NACKed.
func TestRetryOnFromEnvoy(t *testing.T) {
	rc := &routev3.RouteConfiguration{Name: "r", VirtualHosts: []*routev3.VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []*routev3.Route{{
		Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "c"},
			RetryPolicy: &routev3.RetryPolicy{RetryOn: "unavailable,cancelled,retriable-4xx", NumRetries: wrapperspb.UInt32(2)}}},
	}}}}}
	routes, err := RoutesFromEnvoy([]*routev3.RouteConfiguration{rc})
	if err != nil {
		t.Fatal(err)
	}
	if got := routes[0].VirtualHosts[0].Routes[0].Retry.RetryOn; strings.Join(got, ",") != "unavailable,cancelled,retriable-4xx" {
		t.Errorf("retry_on: %v", got)
	}
	cfg := &Config{Routes: routes, Clusters: []Cluster{{Name: "c", PeerIDs: []string{"spiffe://example.org/ns/shop/sa/c"}}}}
	if err := cfg.Validate(); err != nil {
		t.Errorf("validate: %v", err)
	}
	rc.VirtualHosts[0].Routes[0].GetRoute().RetryPolicy.RetryOn = "envoy-ratelimited"
	if _, err := RoutesFromEnvoy([]*routev3.RouteConfiguration{rc}); err == nil || !strings.Contains(err.Error(), "envoy-ratelimited") {
		t.Errorf("an unknown condition: %v", err)
	}
}

// TestRecordedBody: an unsized body is replayable only once read to its
// end within maxRetryBody.
func TestRecordedBody(t *testing.T) {
	small := &recordedBody{r: io.NopCloser(strings.NewReader("hello"))}
	if _, ok := small.complete(); ok {
		t.Fatal("complete before anything was read")
	}
	buf := make([]byte, 3)
	if n, _ := small.Read(buf); n != 3 {
		t.Fatalf("read %d", n)
	}
	if _, ok := small.complete(); ok {
		t.Fatal("complete with the end not yet read")
	}
	if _, err := io.ReadAll(small); err != nil {
		t.Fatal(err)
	}
	if b, ok := small.complete(); !ok || string(b) != "hello" {
		t.Fatalf("complete: %q %v", b, ok)
	}
	empty := &recordedBody{r: io.NopCloser(strings.NewReader(""))}
	_, _ = io.ReadAll(empty)
	if b, ok := empty.complete(); !ok || b == nil {
		t.Fatalf("an empty body read to its end: %v %v", b, ok)
	}
	big := &recordedBody{r: io.NopCloser(strings.NewReader(strings.Repeat("x", maxRetryBody+1)))}
	if n, err := io.Copy(io.Discard, big); err != nil || n != maxRetryBody+1 {
		t.Fatalf("the body passes through whole: %d %v", n, err)
	}
	if _, ok := big.complete(); ok {
		t.Fatal("a body over maxRetryBody is not replayable")
	}
}

// TestReplayBody: a kept body reads the same for every try, reads longer
// than declared as io.ReadAll did, and a try's body once closed reads
// nothing, whoever has its buffer by then.
func TestReplayBody(t *testing.T) {
	for _, n := range []int{1, smallBody - 1, smallBody, smallBody + 1, maxRetryBody} {
		want := strings.Repeat("ab", n)[:n]
		rb, err := readRetryBody(strings.NewReader(want), int64(n))
		if err != nil {
			t.Fatal(err)
		}
		var tries [2]tryBody
		for i := range tries {
			tries[i].open(rb)
		}
		got, err := io.ReadAll(&tries[0])
		if err != nil || string(got) != want {
			t.Fatalf("%d bytes, try 0: %d bytes, %v", n, len(got), err)
		}
		tries[0].Close()
		tries[0].Close() // a second Close releases nothing more
		rb.release()     // RoundTrip's hold
		if rb.refs.Load() != 1 {
			t.Fatalf("%d bytes: %d holds, want try 1's", n, rb.refs.Load())
		}
		got, err = io.ReadAll(&tries[1])
		if err != nil || string(got) != want {
			t.Fatalf("%d bytes, try 1 after try 0 closed: %d bytes, %v", n, len(got), err)
		}
		tries[1].Close()
		for i := range tries {
			if m, err := tries[i].Read(make([]byte, 8)); m != 0 || err != errBodyAfterClose {
				t.Fatalf("%d bytes: try %d read %d, %v after Close", n, i, m, err)
			}
		}
	}
	// Longer than declared: kept up to maxRetryBody+1, for the transport
	// to refuse.
	rb, err := readRetryBody(strings.NewReader(strings.Repeat("x", maxRetryBody+10)), 10)
	if err != nil || len(rb.b) != maxRetryBody+1 {
		t.Fatalf("longer body: %d bytes, %v", len(rb.b), err)
	}
	rb.release()
	rb, err = readRetryBody(strings.NewReader("abc"), 10)
	if err != nil || string(rb.b) != "abc" {
		t.Fatalf("shorter body: %q, %v", rb.b, err)
	}
	rb.release()
	if _, err := readRetryBody(io.MultiReader(strings.NewReader("ab"), iotest.ErrReader(io.ErrUnexpectedEOF)), 10); err != io.ErrUnexpectedEOF {
		t.Fatalf("failing body: %v", err)
	}
}
