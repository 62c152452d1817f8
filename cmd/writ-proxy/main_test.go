package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writmesh/writ/internal/freeport"
	"github.com/writmesh/writ/internal/syncbuf"
)

func TestHelpAndBadFlags(t *testing.T) {
	t.Setenv("WRIT_JOIN_TOKEN", "")
	bundle := writeBundle(t)
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{"help", []string{"--help"}, 0, "WRIT_JOIN_TOKEN", ""},
		{"help names flags", []string{"-h"}, 0, "-workload-api", ""},
		{"help names otlp compression", []string{"-h"}, 0, "-otlp-compression", ""},
		{"nothing", nil, 2, "", "missing --control-plane, --join-token or WRIT_JOIN_TOKEN, --trust-bundle, --trust-domain"},
		{"unknown flag", []string{"--bogus"}, 2, "", "flag provided but not defined: -bogus"},
		{"extra args", []string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", bundle, "--trust-domain", "example.org", "extra"}, 2, "", "unexpected arguments: extra"},
		{"bad level", []string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", bundle, "--trust-domain", "example.org", "--log-level", "loud"}, 2, "", "--log-level"},
		{"bad trust domain", []string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", bundle, "--trust-domain", "Not A Domain"}, 2, "", "trust-domain"},
		{"missing bundle file", []string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", "/nonexistent", "--trust-domain", "example.org"}, 1, "", "trust bundle"},
		{"bad workload api address", []string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", bundle, "--trust-domain", "example.org", "--workload-api", "tcp://1.2.3.4:5"}, 1, "", "unix:///absolute/path.sock"},
	}
	// The ADS path's flags are checked before anything starts.
	base := func(extra ...string) []string {
		return append([]string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", bundle, "--trust-domain", "example.org",
			"--workload-api", "unix://" + filepath.Join(t.TempDir(), "a.sock"), "--admin-addr", "127.0.0.1:0", "--xds-server", "x:1"}, extra...)
	}
	tests = append(tests, []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{"xds with static config", base("--proxy-config", "/p.yaml"), 2, "", "--proxy-config and --xds-server exclude each other"},
		{"xds inbound without app", base("--inbound", "127.0.0.1:15006"), 2, "", "--inbound and --app go together"},
		{"xds bad server id", base("--xds-server-id", "writd"), 2, "", "--xds-server-id"},
		{"xds bad labels", base("--labels", "version"), 2, "", "--labels"},
		{"xds bad upstream", base("--upstream", "orders"), 2, "", "--upstream"},
		{"negative max body", base("--max-body-bytes", "-1"), 2, "", "--max-body-bytes must not be negative"},
		{"zero held body total", base("--max-held-body-bytes-total", "0"), 2, "", "--max-held-body-bytes-total must be positive"},
		{"negative held body total", base("--max-held-body-bytes-total", "-1"), 2, "", "--max-held-body-bytes-total must be positive"},
		{"held body total not a number", base("--max-held-body-bytes-total", "64MiB"), 2, "", "max-held-body-bytes-total"},
		{"zero client watch", base("--watch-client-after", "0s"), 2, "", "--watch-client-after must be positive"},
	}...)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr syncbuf.Buffer
			got := run(context.Background(), tt.args, &stdout, &stderr)
			if got != tt.wantCode {
				t.Fatalf("exit code %d, want %d; stderr: %s", got, tt.wantCode, stderr.String())
			}
			if !strings.Contains(stdout.String(), tt.wantStdout) {
				t.Errorf("stdout %q does not contain %q", stdout.String(), tt.wantStdout)
			}
			if tt.wantCode == 0 && stderr.String() != "" {
				t.Errorf("stderr %q, want nothing", stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.wantStderr) {
				t.Errorf("stderr %q does not contain %q", stderr.String(), tt.wantStderr)
			}
		})
	}
}

// TestServesHealthWhileWaitingForWritdAndStopsCleanly runs the agent
// against an address where nothing listens: it must be alive but not
// ready, expose a world-connectable socket, and stop on cancellation.
func TestServesHealthWhileWaitingForWritdAndStopsCleanly(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	adminAddr := freeAddr(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "missing", "agent.sock")
	t.Setenv("WRIT_JOIN_TOKEN", "token-from-env")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncbuf.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{
			"--control-plane", deadAddr,
			"--trust-bundle", writeBundle(t),
			"--trust-domain", "example.org",
			"--workload-api", "unix://" + sock,
			"--admin-addr", adminAddr,
		}, &stdout, &stderr)
	}()

	waitHTTP(t, "http://"+adminAddr+"/healthz", http.StatusOK)
	if code := get(t, "http://"+adminAddr+"/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz = %d before attestation, want 503", code)
	}
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o777 {
		t.Fatalf("socket mode %v, want a socket with 0777", fi.Mode())
	}
	if strings.Contains(stderr.String(), "token-from-env") {
		t.Fatal("the join token was logged")
	}

	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit code %d after cancellation; stderr: %s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("writ-proxy did not stop after cancellation")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

// freeAddr is a loopback address for the writ-proxy process to bind
// (internal/freeport).
func freeAddr(t *testing.T) string {
	t.Helper()
	return freeport.Addr(t)
}

func get(t *testing.T, u string) int {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// waitHTTP polls until the server answers: startup, not a timed assertion.
func waitHTTP(t *testing.T, u string, want int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(u)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == want {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never answered %d (last error %v)", u, want, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// writeBundle writes a PEM bootstrap bundle with a fresh self-signed root.
func writeBundle(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: "example.org"}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "bundle.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestTracingEndpoint: --otlp-endpoint wins; otherwise OpenTelemetry's
// environment variables are read as its SDKs read them; a bad URL is
// refused.
func TestTracingEndpoint(t *testing.T) {
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
	t.Setenv("OTEL_SERVICE_NAME", "")
	o := &proxyOptions{service: "orders"}
	if u, svc, err := o.tracing(); err != nil || u != "http://collector:4318/v1/traces" || svc != "orders" {
		t.Errorf("base endpoint: %q %q %v", u, svc, err)
	}
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://traces.example/otlp")
	t.Setenv("OTEL_SERVICE_NAME", "shop-orders")
	if u, svc, err := o.tracing(); err != nil || u != "https://traces.example/otlp" || svc != "shop-orders" {
		t.Errorf("traces endpoint: %q %q %v", u, svc, err)
	}
	o.otlpEndpoint = "http://127.0.0.1:4318/v1/traces"
	if u, _, err := o.tracing(); err != nil || u != o.otlpEndpoint {
		t.Errorf("flag: %q %v", u, err)
	}
	o.otlpEndpoint = "collector:4318"
	if _, _, err := o.tracing(); err == nil {
		t.Error("a URL without a scheme was accepted")
	}
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
	o.otlpEndpoint = ""
	if u, _, err := o.tracing(); err != nil || u != "" {
		t.Errorf("nothing configured: %q %v", u, err)
	}
	// OTLP/gRPC: the endpoint is the collector's address, no path added.
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
	if u, _, err := o.tracing(); err != nil || u != "http://collector:4317" {
		t.Errorf("grpc from the environment: %q %v", u, err)
	}
	o.otlpProtocol, o.otlpEndpoint = "http/protobuf", "http://collector:4318/v1/traces"
	if u, _, err := o.tracing(); err != nil || u != o.otlpEndpoint {
		t.Errorf("--otlp-protocol over the environment: %q %v", u, err)
	}
	o.otlpProtocol = "http/json"
	if _, _, err := o.tracing(); err == nil {
		t.Error("an unsupported protocol was accepted")
	}
}

// TestGCPercentPrecedence: the flag wins, then GOGC from the
// environment (left to the runtime), then the sidecar's default.
func TestGCPercentPrecedence(t *testing.T) {
	base := []string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", "b", "--trust-domain", "example.org"}
	for _, c := range []struct {
		name     string
		args     []string
		gogc     string
		want     int
		wantSets bool
	}{
		{"default", nil, "", defaultGCPercent, true},
		{"GOGC given", nil, "200", 0, false},
		{"flag given", []string{"--gc-percent", "80"}, "", 80, true},
		{"flag over GOGC", []string{"--gc-percent", "80"}, "200", 80, true},
		{"flag off", []string{"--gc-percent", "-1"}, "", -1, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			o, code := parseFlags(append(append([]string{}, base...), c.args...), io.Discard, io.Discard)
			if o == nil {
				t.Fatalf("parseFlags: exit %d", code)
			}
			got, sets := gcPercent(o, func(k string) string {
				if k == "GOGC" {
					return c.gogc
				}
				return ""
			})
			if got != c.want || sets != c.wantSets {
				t.Fatalf("gcPercent = %d, %v; want %d, %v", got, sets, c.want, c.wantSets)
			}
		})
	}
}

// TestTrimModeFlags: fault-around is turned off by default and the flag
// turns the userfaultfd registration off (for a seccomp profile that
// kills on the call); the split stays opt-in.
func TestTrimModeFlags(t *testing.T) {
	base := []string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", "b", "--trust-domain", "example.org"}
	for _, c := range []struct {
		args []string
		want trimMode
	}{
		{nil, trimMode{noFaultAround: true}},
		{[]string{"--confine-executable-faults=false"}, trimMode{}},
		{[]string{"--split-executable-mappings"}, trimMode{split: true, noFaultAround: true}},
	} {
		o, code := parseFlags(append(base, c.args...), io.Discard, io.Discard)
		if o == nil {
			t.Fatalf("%v: exit %d", c.args, code)
		}
		if got := o.trimMode(); got != c.want {
			t.Errorf("%v: trim mode %+v, want %+v", c.args, got, c.want)
		}
	}
}
