// Package admin is writd's local admin API: JSON over HTTP on a unix
// socket. The socket's file permissions are the authentication (the socket
// lives in a directory only writd's user can enter), the kernel-verified
// peer uid is checked against an allow list, and every call is recorded in
// admin_events with that uid.
//
// It imports authority and store; only cmd/writd and tests import it.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/internal/peercred"
)

// maxBody bounds every request body.
const maxBody = 64 << 10

// Options configures the admin API.
type Options struct {
	Registry *authority.Registry
	// Bundle returns the current trust bundle.
	Bundle func(ctx context.Context) (*spiffebundle.Bundle, error)
	// CA runs root rotations; nil when the root is upstream.
	CA   RootRotator
	Pool *pgxpool.Pool
	// AllowedUIDs may call besides writd's own uid and root.
	AllowedUIDs []uint32
	Log         *slog.Logger
	// Audit, when set, records each call as an audit event inside the
	// transaction that writes its admin_events row.
	Audit func(ctx context.Context, tx pgx.Tx, ev *audit.Event) error
}

// RootRotator is the part of the CA the admin API drives.
type RootRotator interface {
	RotateRoot(ctx context.Context) (authority.RootRotation, error)
	RootRotationStatus(ctx context.Context) (authority.RootRotation, error)
}

// Server is the admin API. Safe for concurrent use.
type Server struct {
	o       Options
	allowed []uint32
	mux     *http.ServeMux
}

type credKey struct{}

// New returns the admin API server.
func New(o Options) *Server {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{o: o, allowed: append([]uint32{0, uint32(os.Geteuid())}, o.AllowedUIDs...), mux: http.NewServeMux()}
	s.mux.HandleFunc("GET /v1/whoami", s.whoami)
	s.mux.HandleFunc("POST /v1/join-tokens", s.createToken)
	s.mux.HandleFunc("POST /v1/entries", s.createEntry)
	s.mux.HandleFunc("GET /v1/entries", s.listEntries)
	s.mux.HandleFunc("GET /v1/entries/{id}", s.getEntry)
	s.mux.HandleFunc("DELETE /v1/entries/{id}", s.deleteEntry)
	s.mux.HandleFunc("GET /v1/bundle", s.bundle)
	s.mux.HandleFunc("GET /v1/issuances", s.issuances)
	s.mux.HandleFunc("GET /v1/ca/root-rotation", s.rotationStatus)
	s.mux.HandleFunc("POST /v1/ca/root-rotation", s.rotateRoot)
	return s
}

// Handle adds a route (net/http pattern syntax) to the admin API, for
// parts of writd outside this package. The route is authorized and
// recorded like every other; use Note, Actor, WriteJSON, WriteError and
// Decode in the handler. Call it before Serve.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// Note adds a field to the current call's admin event. Never put secrets
// in it.
func Note(r *http.Request, k string, v any) { note(r, k, v) }

// Actor names the caller of the current call, e.g. "uid:1000".
func Actor(r *http.Request) string { return actorOf(r) }

// WriteJSON writes v as the JSON answer.
func WriteJSON(w http.ResponseWriter, code int, v any) { writeJSON(w, code, v) }

// WriteError writes an ErrorBody answer.
func WriteError(w http.ResponseWriter, code int, msg string) { writeError(w, code, msg) }

// Decode reads a JSON request body strictly into v; on failure it has
// answered and returns false.
func Decode(w http.ResponseWriter, r *http.Request, v any) bool { return decode(w, r, v) }

// Listen makes the socket: its directory is created 0700, or must already
// be owned by this user and closed to others; a stale socket file is
// replaced, but not one another process still listens on.
func Listen(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("admin socket dir: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("admin socket dir: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("admin socket dir %s must be owned by uid %d with mode 0700 (it is %v, uid %d): its permissions are what authenticates admins", dir, os.Geteuid(), fi.Mode().Perm(), st.Uid)
	}
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("admin socket %s is in use: is another writd running?", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale admin socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return l, nil
}

// Serve answers on l until ctx is cancelled, then drains for up to 5 s.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      5 * time.Minute,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			cred, err := peercred.Get(c)
			if err != nil {
				return ctx
			}
			return context.WithValue(ctx, credKey{}, cred)
		},
		ErrorLog: slog.NewLogLogger(s.o.Log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	return nil
}

// statusRecorder remembers the status written, for the admin event.
type statusRecorder struct {
	http.ResponseWriter
	status int
	detail map[string]any
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

// Unwrap lets handlers reach the connection's writer through
// http.ResponseController (to flush a streamed answer).
func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

type recKey struct{}

// ServeHTTP authorizes by peer uid, serves, and records the call.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Cache-Control", "no-store")
	cred, ok := r.Context().Value(credKey{}).(peercred.Cred)
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	switch {
	case !ok:
		writeError(rec, http.StatusUnauthorized, "peer credentials unavailable: the admin API answers only on its unix socket")
	case !slices.Contains(s.allowed, cred.UID):
		writeError(rec, http.StatusForbidden, fmt.Sprintf("uid %d may not use the admin API", cred.UID))
	default:
		r.Body = http.MaxBytesReader(rec, r.Body, maxBody)
		s.mux.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), recKey{}, rec)))
	}
	s.record(r, cred, ok, rec)
}

func (s *Server) record(r *http.Request, cred peercred.Cred, ok bool, rec *statusRecorder) {
	actor := "unknown"
	var uid, pid *int64
	if ok {
		actor = "uid:" + strconv.FormatUint(uint64(cred.UID), 10)
		u, p := int64(cred.UID), int64(cred.PID)
		uid, pid = &u, &p
	}
	var detail []byte
	if rec.detail != nil {
		detail, _ = json.Marshal(rec.detail)
	}
	// A fresh context: the call is recorded even if the client went away.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := pgx.BeginFunc(ctx, s.o.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO admin_events (actor, uid, pid, method, path, status, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)`,
			actor, uid, pid, r.Method, r.URL.Path, rec.status, detail); err != nil {
			return err
		}
		if s.o.Audit == nil {
			return nil
		}
		ev, err := audit.NewEvent(audit.KindAdminCall, time.Now())
		if err != nil {
			return err
		}
		ev.Principal, ev.Action, ev.Resource, ev.Status = actor, r.Method, r.URL.Path, rec.status
		ev.Result = "ok"
		switch {
		case rec.status == http.StatusUnauthorized || rec.status == http.StatusForbidden:
			ev.Result = "refused"
		case rec.status >= 400:
			ev.Result = "error"
		}
		attrs := map[string]any{}
		if pid != nil {
			attrs["pid"] = *pid
		}
		if rec.detail != nil {
			attrs["detail"] = rec.detail
		}
		if err := ev.SetAttributes(attrs); err != nil {
			return err
		}
		return s.o.Audit(ctx, tx, &ev)
	})
	if err != nil {
		s.o.Log.Error("record admin event", "error", err)
	}
	s.o.Log.Info("admin call", "actor", actor, "method", r.Method, "path", r.URL.Path, "status", rec.status)
}

// note adds fields to the call's admin event. Never put secrets here.
func note(r *http.Request, k string, v any) {
	if rec, ok := r.Context().Value(recKey{}).(*statusRecorder); ok {
		if rec.detail == nil {
			rec.detail = map[string]any{}
		}
		rec.detail[k] = v
	}
}

func actorOf(r *http.Request) string {
	if c, ok := r.Context().Value(credKey{}).(peercred.Cred); ok {
		return "uid:" + strconv.FormatUint(uint64(c.UID), 10)
	}
	return "unknown"
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// ErrorBody is every error response.
type ErrorBody struct {
	Error string `json:"error"`
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, ErrorBody{Error: msg})
}

// fail maps an error to a response: input errors are the caller's and
// are returned as is; anything else is logged and hidden.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	var ie *authority.InputError
	switch {
	case errors.As(err, &ie):
		writeError(w, http.StatusBadRequest, ie.Msg)
	case errors.Is(err, authority.ErrNotFound):
		writeError(w, http.StatusNotFound, "not found")
	default:
		s.o.Log.Error("admin api", "path", r.URL.Path, "error", err)
		writeError(w, http.StatusInternalServerError, "internal error; see writd's log")
	}
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		writeError(w, http.StatusUnsupportedMediaType, "send Content-Type: application/json")
		return false
	}
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error())
		return false
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		writeError(w, http.StatusBadRequest, "invalid JSON body: trailing data")
		return false
	}
	return true
}
