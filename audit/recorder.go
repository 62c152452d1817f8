package audit

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// RecorderOptions say where a decision point (writ-proxy, writ-enforcer)
// keeps its audit events and where it ships them. Both binaries register
// the same flags through RegisterFlags, so the surface is identical.
type RecorderOptions struct {
	// SpoolDir is the spool directory; empty means no durable audit.
	SpoolDir   string
	Durability Durability
	MaxBytes   int64
	OnFull     FullPolicy
	// Collector is writd's gRPC address (host:port).
	Collector string
	// Headers are the request headers kept in request events
	// (NewRedaction refuses credential headers); DefaultAllowedHeaders
	// when empty.
	Headers []string
}

// RegisterFlags adds the --audit-* flags to fs.
func (o *RecorderOptions) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.SpoolDir, "audit-spool-dir", "", "audit spool directory: each decision is written here before it is returned, then shipped to writd's collector")
	fs.Func("audit-durability", "audit spool durability: fsync-grouped (return after write(2), fsync every 10ms) or fsync-per-event (return after an fsync covering the event)", func(s string) error {
		d, err := ParseDurability(s)
		o.Durability = d
		return err
	})
	fs.Func("audit-max-bytes", "audit spool bound in bytes (default 1 GiB); what happens at the bound is --audit-on-full", func(s string) error {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 64<<10 {
			return errors.New("want a number of bytes, at least 65536")
		}
		o.MaxBytes = n
		return nil
	})
	fs.Func("audit-on-full", "at the spool bound: fail-closed (deny the request, the default) or fail-open-with-alarm", func(s string) error {
		p, err := ParseFullPolicy(s)
		o.OnFull = p
		return err
	})
	fs.StringVar(&o.Collector, "audit-collector", "", "writd gRPC address receiving the audit stream, host:port")
	fs.Func("audit-header", "a request header kept in audit events (repeatable; credentials such as authorization and cookie are refused); default user-agent, x-request-id, content-type, traceparent", func(s string) error {
		if _, err := NewRedaction([]string{s}); err != nil {
			return err
		}
		o.Headers = append(o.Headers, s)
		return nil
	})
}

// Enabled says whether a spool directory was configured.
func (o *RecorderOptions) Enabled() bool { return o.SpoolDir != "" }

// RecorderEnv is what a Recorder needs from its process.
type RecorderEnv struct {
	// ID is the recorder's SPIFFE ID (its SVID); the collector accepts
	// only events whose source is that ID or ID#instance.
	ID string
	// TLS presents the recorder's SVID and authorizes writd's
	// control-plane identity (authority/svidtls.ClientConfig).
	TLS        *tls.Config
	Clock      clockwork.Clock
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Recorder is a spool and the shipper draining it to writd's collector:
// the durable audit of one decision point. Append through Spool; run Run
// in the process's task group; Close after Run returned.
type Recorder struct {
	Spool *Spool
	// Redaction keeps the configured headers (Headers) in request events.
	Redaction *Redaction
	shipper   *Shipper
	conn      *grpc.ClientConn
}

// OpenRecorder opens (and recovers) the spool in o.SpoolDir and prepares
// the shipper. The chain's source is env.ID#INSTANCE, where INSTANCE is a
// random name kept in the spool directory: replicas of one workload share
// a SPIFFE ID but each spool is its own chain, so each needs its own
// source. A lost spool directory starts a new source rather than
// restarting a chain the database already holds.
func OpenRecorder(o RecorderOptions, env RecorderEnv) (*Recorder, error) {
	if o.SpoolDir == "" {
		return nil, errors.New("audit: no spool directory")
	}
	if o.Collector == "" {
		return nil, errors.New("audit: no collector address (--audit-collector)")
	}
	if env.ID == "" || env.TLS == nil {
		return nil, errors.New("audit: recorder identity and TLS configuration are required")
	}
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(o.SpoolDir, 0o700); err != nil {
		return nil, fmt.Errorf("audit spool: %w", err)
	}
	hs := o.Headers
	if len(hs) == 0 {
		hs = DefaultAllowedHeaders
	}
	red, err := NewRedaction(hs)
	if err != nil {
		return nil, err
	}
	inst, err := instanceName(o.SpoolDir)
	if err != nil {
		return nil, err
	}
	sp, err := OpenSpool(SpoolOptions{
		Dir: o.SpoolDir, Source: env.ID + "#" + inst, Durability: o.Durability, MaxBytes: o.MaxBytes, OnFull: o.OnFull,
		Clock: env.Clock, Logger: env.Logger, Registerer: env.Registerer,
	})
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(o.Collector, grpc.WithTransportCredentials(credentials.NewTLS(env.TLS)))
	if err != nil {
		sp.Close()
		return nil, fmt.Errorf("audit collector %s: %w", o.Collector, err)
	}
	sh, err := NewShipper(ShipperOptions{Spool: sp, Conn: conn, Clock: env.Clock, Logger: env.Logger})
	if err != nil {
		conn.Close()
		sp.Close()
		return nil, err
	}
	env.Logger.Info("audit spool open", "dir", o.SpoolDir, "source", sp.Source(), "durability", sp.o.Durability,
		"max_bytes", sp.o.MaxBytes, "on_full", sp.o.OnFull, "collector", o.Collector, "next_seq", sp.Stats().NextSeq)
	return &Recorder{Spool: sp, Redaction: red, shipper: sh, conn: conn}, nil
}

// Run ships the spool until ctx ends.
func (r *Recorder) Run(ctx context.Context) error { return r.shipper.Run(ctx) }

// Close closes the connection and the spool (fsyncing it).
func (r *Recorder) Close() error {
	r.conn.Close()
	return r.Spool.Close()
}

// instanceName reads or creates the spool's instance name.
func instanceName(dir string) (string, error) {
	path := filepath.Join(dir, "instance")
	if b, err := os.ReadFile(path); err == nil {
		s := strings.TrimSpace(string(b))
		if len(s) != 16 || strings.Trim(s, "0123456789abcdef") != "" {
			return "", fmt.Errorf("audit spool: %s holds %q, not an instance name", path, s)
		}
		return s, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("audit spool: %w", err)
	}
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	s := hex.EncodeToString(b)
	// Written and fsynced before any event carries it.
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", fmt.Errorf("audit spool: %w", err)
	}
	if _, err := f.WriteString(s + "\n"); err != nil {
		f.Close()
		return "", fmt.Errorf("audit spool: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return "", fmt.Errorf("audit spool: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return s, syncDir(dir)
}

// SourceOf returns the SPIFFE ID part of an event source ("ID#instance"
// or "ID"), or "" when the instance is not 1 to 64 letters, digits, dots,
// dashes or underscores (so that no caller can name chains at will with
// arbitrary text).
func SourceOf(source string) string {
	id, inst, ok := strings.Cut(source, "#")
	if !ok {
		return id
	}
	if len(inst) == 0 || len(inst) > 64 {
		return ""
	}
	for _, c := range inst {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '-' || c == '_') {
			return ""
		}
	}
	return id
}
