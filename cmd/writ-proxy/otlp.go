package main

import (
	"fmt"
	"strconv"
	"time"

	"github.com/writmesh/writ/proxy"
)

// otlpEnv is an OpenTelemetry exporter variable: the traces-specific
// one (OTEL_EXPORTER_OTLP_TRACES_NAME) wins over the general one, whole,
// as the SDKs read them.
func otlpEnv(getenv func(string) string, name string) (string, string) {
	if v := getenv("OTEL_EXPORTER_OTLP_TRACES_" + name); v != "" {
		return v, "OTEL_EXPORTER_OTLP_TRACES_" + name
	}
	return getenv("OTEL_EXPORTER_OTLP_" + name), "OTEL_EXPORTER_OTLP_" + name
}

// otlpExport is how spans reach the collector: flags, else the
// environment. Errors name the variable, never a header's value.
func (o *proxyOptions) otlpExport(getenv func(string) string) (proxy.OTLPExport, error) {
	var x proxy.OTLPExport
	var err error
	var name string
	if v, name := otlpEnv(getenv, "HEADERS"); v != "" {
		if x.Headers, err = proxy.ParseOTLPHeaders(v); err != nil {
			return x, fmt.Errorf("%s: %w", name, err)
		}
	}
	file := func(flag, env string) string {
		if flag != "" {
			return flag
		}
		v, _ := otlpEnv(getenv, env)
		return v
	}
	if x.TLS, err = proxy.OTLPTLSConfig(file(o.otlpCA, "CERTIFICATE"), file(o.otlpCert, "CLIENT_CERTIFICATE"), file(o.otlpKey, "CLIENT_KEY")); err != nil {
		return x, err
	}
	x.Timeout = o.otlpTimeout
	if o.otlpTimeout < 0 {
		return x, fmt.Errorf("--otlp-timeout %v: want a positive duration", o.otlpTimeout)
	}
	if v, name := otlpEnv(getenv, "TIMEOUT"); x.Timeout == 0 && v != "" {
		ms, err := strconv.ParseUint(v, 10, 31)
		if err != nil || ms == 0 {
			return x, fmt.Errorf("%s=%q: want a positive number of milliseconds", name, v)
		}
		x.Timeout = time.Duration(ms) * time.Millisecond
	}
	x.Compression, name = o.otlpCompress, "--otlp-compression"
	if x.Compression == "" {
		x.Compression, name = otlpEnv(getenv, "COMPRESSION")
	}
	switch x.Compression {
	case "", proxy.OTLPCompressionGzip, proxy.OTLPCompressionNone:
	default:
		return x, fmt.Errorf("%s=%q: want %s or %s", name, x.Compression, proxy.OTLPCompressionGzip, proxy.OTLPCompressionNone)
	}
	return x, nil
}
