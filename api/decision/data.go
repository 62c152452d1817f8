package decision

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/open-policy-agent/opa/v1/ast"

	"github.com/writmesh/writ/policy"
)

// Bounds on a data path.
const (
	maxDataPathLen      = 1024
	maxDataPathSegments = 32
)

// dataRequest is the body of POST /v1/data/{path}, as OPA takes it.
type dataRequest struct {
	Input *any `json:"input"`
}

// dataResponse is OPA's answer shape: result is absent when the document
// is undefined.
type dataResponse struct {
	DecisionID string   `json:"decision_id"`
	Result     *any     `json:"result,omitempty"`
	Warning    *warning `json:"warning,omitempty"`
}

type warning struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// dataPath reads the data path from the escaped URL path as OPA does
// (segments split on "/", then unescaped; empty ones skipped) and returns
// it canonical: segments joined by "/". A segment that unescapes to
// contain "/" or "\" is refused, so that the path the admin policy sees
// names exactly one document.
func dataPath(r *http.Request) (string, error) {
	raw := strings.TrimPrefix(r.URL.EscapedPath(), "/v1/data")
	if len(raw) > maxDataPathLen {
		return "", fmt.Errorf("data path longer than %d bytes", maxDataPathLen)
	}
	var segs []string
	for seg := range strings.SplitSeq(raw, "/") {
		if seg == "" {
			continue
		}
		u, err := url.PathUnescape(seg)
		if err != nil {
			return "", fmt.Errorf("data path segment %q: %v", seg, err)
		}
		if u == "" || strings.ContainsAny(u, "/\\\"\x00") || !printableUTF8(u) {
			return "", fmt.Errorf("data path segment %q: must not contain '/', '\\', '\"' or control characters", seg)
		}
		segs = append(segs, u)
	}
	if len(segs) > maxDataPathSegments {
		return "", fmt.Errorf("data path has more than %d segments", maxDataPathSegments)
	}
	return strings.Join(segs, "/"), nil
}

func printableUTF8(s string) bool {
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == '\uFFFD' {
			return false
		}
	}
	return true
}

// data serves OPA's data API: POST /v1/data/{path} with {"input": ...}
// and GET /v1/data/{path} without input.
func (s *Server) data(c *call) {
	path, err := dataPath(c.r)
	if err != nil {
		s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
		return
	}
	pretty := false
	for k, v := range c.r.URL.Query() {
		switch {
		case k == "pretty" && len(v) == 1 && (v[0] == "" || v[0] == "true" || v[0] == "false"):
			pretty = v[0] != "false"
		case k == "input" && c.r.Method == http.MethodGet:
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, "input in the query is not supported: POST it as {\"input\": ...}")
			return
		default:
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, fmt.Sprintf("query parameter %q is not supported", k))
			return
		}
	}
	action := "read"
	if c.r.Method == http.MethodPost {
		action = "evaluate"
	}
	if !s.authorize(c, action, path) {
		return
	}
	var (
		input   any
		hasIn   bool
		warnMsg *warning
	)
	if c.r.Method == http.MethodPost {
		body, ok := s.readBody(c)
		if !ok {
			return
		}
		if body != nil {
			var req dataRequest
			if err := decodeStrict(body, &req); err != nil {
				s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
				return
			}
			if req.Input != nil {
				input, hasIn = *req.Input, true
			}
		}
		if !hasIn {
			// As OPA: answer, but say that the input is missing.
			warnMsg = &warning{Code: "api_usage_warning", Message: "'input' key missing from the request"}
		}
	}
	ref, err := policy.ParseDataPath(path)
	if err != nil {
		s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
		return
	}
	var in ast.Value
	dig := ""
	if hasIn {
		if in, err = ast.InterfaceToValue(input); err != nil {
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, "input: "+err.Error())
			return
		}
		dig = digest(input)
	}
	ctx := c.ctx
	snap := s.engine.Snapshot()
	rec := s.record(c, path, 0, dig)
	rec.PolicyRevision = snap.Revision()
	res, err := snap.EvalPath(ctx, ref, in)
	if err != nil {
		rec.Result, rec.Cause, rec.Reason = ResultError, CausePolicyError, err.Error()
		if !s.audit(c, rec) {
			return
		}
		msg := "policy evaluation failed"
		if ctx.Err() != nil {
			msg = "policy evaluation timed out"
		}
		s.fail(c, http.StatusInternalServerError, codeInternal, msg)
		return
	}
	resp := dataResponse{DecisionID: rec.ID, Warning: warnMsg}
	rec.Cause = CausePolicy
	rec.MatchedRules = res.Rules
	if res.Defined {
		rec.Result, rec.Reason = ResultDefined, "document defined"
		resp.Result = &res.Value
	} else {
		rec.Result, rec.Cause, rec.Reason = ResultUndefined, CauseUndefined, "document undefined"
	}
	if !s.audit(c, rec) {
		return
	}
	writeJSON(c.w, http.StatusOK, resp, pretty)
}
