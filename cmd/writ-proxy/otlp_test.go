package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writmesh/writ/internal/syncbuf"
)

// TestOTLPExportEnv: the OpenTelemetry exporter variables, the traces
// form over the general one, flags over both; bad values are errors
// naming the variable and never a header's value.
func TestOTLPExportEnv(t *testing.T) {
	env := func(kv map[string]string) func(string) string {
		return func(k string) string { return kv[k] }
	}
	o := &proxyOptions{}
	x, err := o.otlpExport(env(map[string]string{
		"OTEL_EXPORTER_OTLP_HEADERS":        "authorization=Basic%20abc",
		"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-api-key=k%3D1",
		"OTEL_EXPORTER_OTLP_TIMEOUT":        "2500",
	}))
	if err != nil || len(x.Headers) != 1 || x.Headers["x-api-key"] != "k=1" || x.Timeout != 2500*time.Millisecond || x.TLS != nil {
		t.Fatalf("otlpExport: %+v %v", x, err)
	}
	o.otlpTimeout = time.Second
	if x, err := o.otlpExport(env(map[string]string{"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500"})); err != nil || x.Timeout != time.Second {
		t.Fatalf("--otlp-timeout over the environment: %v %v", x.Timeout, err)
	}
	o.otlpTimeout = 0
	for _, tc := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-api-key=%zzTOPSECRET"}, "OTEL_EXPORTER_OTLP_TRACES_HEADERS: otlp headers: x-api-key: invalid value"},
		{map[string]string{"OTEL_EXPORTER_OTLP_HEADERS": "TOPSECRET"}, "OTEL_EXPORTER_OTLP_HEADERS"},
		{map[string]string{"OTEL_EXPORTER_OTLP_TIMEOUT": "10s"}, "OTEL_EXPORTER_OTLP_TIMEOUT=\"10s\": want a positive number of milliseconds"},
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"},
		{map[string]string{"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"}, "otlp certificate"},
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": "/nonexistent/c.pem"}, "client certificate and client key go together"},
	} {
		_, err := o.otlpExport(env(tc.env))
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "TOPSECRET") {
			t.Errorf("%v: %v, want %q (and no header value)", tc.env, err, tc.want)
		}
	}
	// Compression: --otlp-compression, else the traces variable, else the
	// general one, else none (empty); a bad value names its source.
	for _, tc := range []struct {
		flag string
		env  map[string]string
		want string
	}{
		{"", nil, ""},
		{"", map[string]string{"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, "gzip"},
		{"", map[string]string{"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "none"}, "none"},
		{"", map[string]string{"OTEL_EXPORTER_OTLP_COMPRESSION": "none", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"}, "gzip"},
		{"gzip", map[string]string{"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "none"}, "gzip"},
		{"none", map[string]string{"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, "none"},
		{"none", map[string]string{"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zstd"}, "none"},
	} {
		o := &proxyOptions{otlpCompress: tc.flag}
		if x, err := o.otlpExport(env(tc.env)); err != nil || x.Compression != tc.want {
			t.Errorf("--otlp-compression %q, %v: %q %v, want %q", tc.flag, tc.env, x.Compression, err, tc.want)
		}
	}
	for _, tc := range []struct {
		flag string
		env  map[string]string
		want string
	}{
		{"zstd", nil, `--otlp-compression="zstd": want gzip or none`},
		{"GZIP", nil, `--otlp-compression="GZIP"`},
		{"", map[string]string{"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "deflate"}, `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION="deflate": want gzip or none`},
		{"", map[string]string{"OTEL_EXPORTER_OTLP_COMPRESSION": "br"}, `OTEL_EXPORTER_OTLP_COMPRESSION="br"`},
	} {
		o := &proxyOptions{otlpCompress: tc.flag}
		if _, err := o.otlpExport(env(tc.env)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("--otlp-compression %q, %v: %v, want %q", tc.flag, tc.env, err, tc.want)
		}
	}
	// Flags win over the environment's files.
	o.otlpCA = "/nonexistent/flag-ca.pem"
	if _, err := o.otlpExport(env(map[string]string{"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/env-ca.pem"})); err == nil || !strings.Contains(err.Error(), "flag-ca.pem") {
		t.Errorf("--otlp-ca-file over the environment: %v", err)
	}
}

// TestOTLPBadSettingsFailStartup: a bad exporter setting stops writ-proxy
// before it starts anything, saying which variable, without the value.
func TestOTLPBadSettingsFailStartup(t *testing.T) {
	t.Setenv("WRIT_JOIN_TOKEN", "")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318")
	t.Setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=TOPSECRET%")
	var stdout, stderr syncbuf.Buffer
	args := []string{"--control-plane", "x:1", "--join-token", "t", "--trust-bundle", writeBundle(t), "--trust-domain", "example.org",
		"--workload-api", "unix://" + filepath.Join(t.TempDir(), "a.sock"), "--admin-addr", "127.0.0.1:0", "--xds-server", "x:1"}
	if code := run(context.Background(), args, &stdout, &stderr); code == 0 || !strings.Contains(stderr.String(), "OTEL_EXPORTER_OTLP_HEADERS") || strings.Contains(stderr.String()+stdout.String(), "TOPSECRET") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	t.Setenv("OTEL_EXPORTER_OTLP_HEADERS", "")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
	// An unknown compression, from the environment or the flag, stops it
	// as a bad flag does.
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd")
	if code := run(context.Background(), args, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION=\"zstd\": want gzip or none`) {
		t.Fatalf("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION=zstd: exit %d, stderr %q", code, stderr.String())
	}
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "")
	if code := run(context.Background(), append(args, "--otlp-compression", "lz4"), &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), `--otlp-compression=\"lz4\"`) {
		t.Fatalf("--otlp-compression lz4: exit %d, stderr %q", code, stderr.String())
	}
	// A CA for a plaintext endpoint is a mistake, not ignored.
	if code := run(context.Background(), append(args, "--otlp-ca-file", writeBundle(t)), &stdout, &stderr); code == 0 || !strings.Contains(stderr.String(), "not https://") {
		t.Fatalf("a CA file with an http:// endpoint: exit %d, stderr %q", code, stderr.String())
	}
}
