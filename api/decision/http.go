package decision

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/open-policy-agent/opa/v1/ast"
)

// Limits on what a request may carry besides its body.
const (
	maxRequestIDLen = 256
	maxJSONDepth    = 64
)

// Error codes in error bodies, as OPA's REST API names them.
const (
	codeInvalidParameter = "invalid_parameter"
	codeUnauthorized     = "unauthorized"
	codeForbidden        = "forbidden"
	codeInternal         = "internal_error"
	codeUnavailable      = "unavailable"
	codeTooLarge         = "request_too_large"
	codeUnsupportedMedia = "unsupported_media_type"
)

// apiError is an error body: {"code": ..., "message": ...}, the shape of
// OPA's REST API errors, used by both APIs. message is for the caller;
// causes stay in the log.
type apiError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// call is one request being served.
type call struct {
	// ctx bounds the whole request's evaluation (admin policy included)
	// by the evaluation timeout.
	ctx       context.Context
	api       string
	caller    Caller
	requestID string
	start     time.Time
	w         http.ResponseWriter
	r         *http.Request
}

// serve wraps an API handler: request id, authentication, the admin
// policy, metrics.
func (s *Server) serve(api string, h func(c *call)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), s.timeout)
		defer cancel()
		c := &call{ctx: ctx, api: api, start: s.clock.Now(), w: w, r: r}
		rw := &statusWriter{ResponseWriter: w}
		c.w = rw
		defer func() { s.metrics.request(api, rw.status, s.clock.Since(c.start)) }()
		c.requestID = r.Header.Get("X-Request-ID") // checked and echoed by ServeHTTP
		caller, err := s.authenticate(r)
		if err != nil {
			s.log.Debug("decision api: unauthenticated", "api", api, "remote", r.RemoteAddr, "err", err)
			w.Header().Set("WWW-Authenticate", `Bearer realm="writ"`)
			s.fail(c, http.StatusUnauthorized, codeUnauthorized, err.Error())
			return
		}
		c.caller = caller
		h(c)
	}
}

// authorize asks the admin policy whether c's caller may make this
// request; it answers the request itself and returns false when not.
func (s *Server) authorize(c *call, action, path string) bool {
	in := map[string]any{
		"caller": c.caller.input(),
		"api":    c.api,
		"action": action,
		"method": c.r.Method,
		"path":   path,
	}
	ctx := c.ctx
	v, err := ast.InterfaceToValue(in)
	if err != nil {
		s.fail(c, http.StatusInternalServerError, codeInternal, "admin policy input")
		return false
	}
	res, err := s.admin.Eval(ctx, v)
	if err != nil {
		s.log.Error("decision api: admin policy failed", "caller", c.caller.ID.String(), "api", c.api, "path", path, "err", err)
		s.fail(c, http.StatusInternalServerError, codeInternal, "admin policy evaluation failed")
		return false
	}
	if allowed, ok := res.Value.(bool); res.Defined && ok && allowed {
		return true
	}
	rec := s.record(c, path, 0, "")
	rec.Result, rec.Cause, rec.Reason, rec.PolicyRevision = ResultForbidden, CauseAdminPolicy, "the admin policy does not allow this caller this request", res.Revision
	if !s.audit(c, rec) {
		return false
	}
	s.fail(c, http.StatusForbidden, codeForbidden, fmt.Sprintf("%s may not %s %s on the %s API", c.caller.ID, action, displayPath(path), c.api))
	return false
}

func displayPath(p string) string {
	if p == "" {
		return "data"
	}
	return p
}

// record starts an audit record of c.
func (s *Server) record(c *call, path string, item int, digest string) Record {
	id, err := uuid.NewV7()
	if err != nil {
		id = uuid.New()
	}
	return Record{
		ID: id.String(), Time: c.start, Caller: c.caller.ID.String(), Auth: c.caller.Auth,
		API: c.api, Path: path, Item: item, RequestID: c.requestID, InputDigest: digest,
	}
}

// audit hands recs (one answer's records) to the sink and counts them; on
// a sink error it answers 503 and returns false. A BatchSink takes them in
// one call, all or none; other sinks one by one, stopping at the first
// error.
func (s *Server) audit(c *call, recs ...Record) bool {
	lat := s.clock.Since(c.start)
	for i := range recs {
		recs[i].Latency = lat
	}
	var err error
	if bs, ok := s.sink.(BatchSink); ok && len(recs) > 1 {
		err = bs.RecordBatch(c.r.Context(), recs)
	} else {
		for _, rec := range recs {
			if err = s.sink.Record(c.r.Context(), rec); err != nil {
				break
			}
		}
	}
	if err != nil {
		s.log.Error("decision api: audit sink refused a record; answer withheld", "id", recs[0].ID, "api", c.api, "records", len(recs), "err", err)
		s.metrics.sinkError(c.api)
		s.fail(c, http.StatusServiceUnavailable, codeUnavailable, "the decision could not be audited")
		return false
	}
	for _, rec := range recs {
		s.metrics.decision(rec.API, rec.Result)
	}
	return true
}

func (s *Server) fail(c *call, status int, code, msg string) {
	writeJSON(c.w, status, apiError{Code: code, Message: msg}, false)
}

func writeJSON(w http.ResponseWriter, status int, v any, pretty bool) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(true)
	if pretty {
		enc.SetIndent("", "  ")
	}
	if err := enc.Encode(v); err != nil {
		status = http.StatusInternalServerError
		buf.Reset()
		buf.WriteString(`{"code":"internal_error","message":"encode response"}` + "\n")
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// readBody reads a bounded JSON body; it answers and returns false on a
// body too large or of another media type. An empty body is nil.
func (s *Server) readBody(c *call) ([]byte, bool) {
	if ct := c.r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			s.fail(c, http.StatusUnsupportedMediaType, codeUnsupportedMedia, "request body must be application/json")
			return nil, false
		}
	}
	body, err := io.ReadAll(http.MaxBytesReader(c.w, c.r.Body, s.maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			s.fail(c, http.StatusRequestEntityTooLarge, codeTooLarge, fmt.Sprintf("request body exceeds %d bytes", s.maxBody))
			return nil, false
		}
		s.fail(c, http.StatusBadRequest, codeInvalidParameter, "read request body")
		return nil, false
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, true
	}
	return body, true
}

// decodeStrict decodes exactly one JSON value into v: unknown fields,
// duplicate keys, nesting deeper than maxJSONDepth and trailing data are
// errors, numbers keep their text. The error text is fit for a 400.
func decodeStrict(body []byte, v any) error {
	if err := checkJSON(body); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return describeJSONError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("invalid JSON: data after the top-level value")
	}
	return nil
}

func describeJSONError(err error) error {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Errorf("invalid JSON at byte %d: %v", se.Offset, se)
	case errors.As(err, &te):
		field := te.Field
		if field == "" {
			field = "request"
		}
		return fmt.Errorf("%s: want %s, got JSON %s", field, jsonKind(te.Type.Kind().String()), te.Value)
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return errors.New("invalid JSON: unexpected end of input")
	}
	msg := strings.TrimPrefix(err.Error(), "json: ")
	return errors.New(msg)
}

func jsonKind(k string) string {
	switch k {
	case "map", "struct":
		return "an object"
	case "slice":
		return "an array"
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	}
	return k
}

// checkJSON walks body's tokens once to refuse duplicate object keys and
// deep nesting, which encoding/json accepts silently (last key wins).
func checkJSON(body []byte) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	type frame struct {
		object bool
		keys   map[string]struct{}
		key    bool // next token in an object is a key
	}
	var stack []*frame
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return describeJSONError(err)
		}
		var top *frame
		if n := len(stack); n > 0 {
			top = stack[n-1]
		}
		if top != nil && top.object && top.key {
			if k, ok := tok.(string); ok {
				if _, dup := top.keys[k]; dup {
					return fmt.Errorf("invalid JSON: duplicate key %q", k)
				}
				top.keys[k] = struct{}{}
				top.key = false
				continue
			}
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			if len(stack) >= maxJSONDepth {
				return fmt.Errorf("invalid JSON: nested deeper than %d levels", maxJSONDepth)
			}
			stack = append(stack, &frame{object: tok == json.Delim('{'), keys: map[string]struct{}{}, key: true})
			continue
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
		}
		if n := len(stack); n > 0 && stack[n-1].object {
			stack[n-1].key = true // a value ended: a key comes next
		}
		if len(stack) == 0 {
			// A complete top-level value; decodeStrict reports trailing data.
			if dec.More() {
				return errors.New("invalid JSON: data after the top-level value")
			}
		}
	}
}

// digest is the input's canonical JSON hashed: encoding/json sorts map
// keys, so equal inputs give equal digests.
func digest(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

func parseURL(s string) (*url.URL, error) { return url.Parse(s) }

// statusWriter remembers the status for metrics.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}
