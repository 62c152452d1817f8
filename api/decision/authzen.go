package decision

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/open-policy-agent/opa/v1/ast"

	"github.com/writmesh/writ/policy"
)

// AuthZEN evaluation semantics of a batch (options.evaluations_semantic).
const (
	ExecuteAll          = "execute_all"
	DenyOnFirstDeny     = "deny_on_first_deny"
	PermitOnFirstPermit = "permit_on_first_permit"
)

// entity is an AuthZEN subject or resource.
type entity struct {
	Type       *string        `json:"type"`
	ID         *string        `json:"id"`
	Properties map[string]any `json:"properties,omitempty"`
}

// action is an AuthZEN action.
type action struct {
	Name       *string        `json:"name"`
	Properties map[string]any `json:"properties,omitempty"`
}

// tuple is the 4-tuple of one evaluation; in a batch, any part may come
// from the top-level defaults.
type tuple struct {
	Subject  *entity        `json:"subject"`
	Resource *entity        `json:"resource"`
	Action   *action        `json:"action"`
	Context  map[string]any `json:"context"`
}

type evaluationsRequest struct {
	tuple
	Evaluations []tuple        `json:"evaluations"`
	Options     map[string]any `json:"options"`
}

// evaluationResponse is one AuthZEN decision.
type evaluationResponse struct {
	Decision bool           `json:"decision"`
	Context  map[string]any `json:"context,omitempty"`
}

// merged applies the batch defaults d to t: a part present in the item
// replaces the default whole, as the specification says.
func (t tuple) merged(d tuple) tuple {
	if t.Subject == nil {
		t.Subject = d.Subject
	}
	if t.Resource == nil {
		t.Resource = d.Resource
	}
	if t.Action == nil {
		t.Action = d.Action
	}
	if t.Context == nil {
		t.Context = d.Context
	}
	return t
}

// validate checks the required members, naming where one is missing.
func (t tuple) validate(where string) error {
	var missing []string
	need := func(ok bool, name string) {
		if !ok {
			missing = append(missing, where+name)
		}
	}
	need(t.Subject != nil, "subject")
	if t.Subject != nil {
		need(t.Subject.Type != nil && *t.Subject.Type != "", "subject.type")
		need(t.Subject.ID != nil && *t.Subject.ID != "", "subject.id")
	}
	need(t.Resource != nil, "resource")
	if t.Resource != nil {
		need(t.Resource.Type != nil && *t.Resource.Type != "", "resource.type")
		need(t.Resource.ID != nil && *t.Resource.ID != "", "resource.id")
	}
	need(t.Action != nil, "action")
	if t.Action != nil {
		need(t.Action.Name != nil && *t.Action.Name != "", "action.name")
	}
	if len(missing) > 0 {
		return fmt.Errorf("required and missing or empty: %s", strings.Join(missing, ", "))
	}
	return nil
}

// input is the Rego input of the evaluation (see the package doc).
func (t tuple) input(c Caller) map[string]any {
	ent := func(e *entity) map[string]any {
		m := map[string]any{"type": *e.Type, "id": *e.ID}
		if e.Properties != nil {
			m["properties"] = e.Properties
		}
		return m
	}
	act := map[string]any{"name": *t.Action.Name}
	if t.Action.Properties != nil {
		act["properties"] = t.Action.Properties
	}
	ctx := t.Context
	if ctx == nil {
		ctx = map[string]any{}
	}
	return map[string]any{
		"subject":  ent(t.Subject),
		"resource": ent(t.Resource),
		"action":   act,
		"context":  ctx,
		"writ":     map[string]any{"api": APIAuthZEN, "caller": c.input()},
	}
}

// evaluation serves POST /access/v1/evaluation.
func (s *Server) evaluation(c *call) {
	if !s.authorize(c, "evaluate", c.r.URL.Path) {
		return
	}
	body, ok := s.readBody(c)
	if !ok {
		return
	}
	var t tuple
	if err := s.decodeRequest(body, &t); err != nil {
		s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
		return
	}
	if err := t.validate(""); err != nil {
		s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
		return
	}
	ctx := c.ctx
	snap := s.engine.Snapshot()
	resp, rec := s.evaluate(ctx, c, snap, t, 0)
	if !s.audit(c, rec) {
		return
	}
	writeJSON(c.w, http.StatusOK, resp, false)
}

// evaluations serves POST /access/v1/evaluations.
func (s *Server) evaluations(c *call) {
	if !s.authorize(c, "evaluate", c.r.URL.Path) {
		return
	}
	body, ok := s.readBody(c)
	if !ok {
		return
	}
	var req evaluationsRequest
	if err := s.decodeRequest(body, &req); err != nil {
		s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
		return
	}
	semantic := ExecuteAll
	if v, ok := req.Options["evaluations_semantic"]; ok {
		str, _ := v.(string)
		switch str {
		case ExecuteAll, DenyOnFirstDeny, PermitOnFirstPermit:
			semantic = str
		default:
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, fmt.Sprintf("options.evaluations_semantic: want %s, %s or %s", ExecuteAll, DenyOnFirstDeny, PermitOnFirstPermit))
			return
		}
	}
	ctx := c.ctx
	snap := s.engine.Snapshot() // one policy set answers the whole batch
	if len(req.Evaluations) == 0 {
		// No evaluations: a single evaluation of the top-level tuple.
		if err := req.tuple.validate(""); err != nil {
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
			return
		}
		resp, rec := s.evaluate(ctx, c, snap, req.tuple, 0)
		if !s.audit(c, rec) {
			return
		}
		writeJSON(c.w, http.StatusOK, resp, false)
		return
	}
	if len(req.Evaluations) > s.maxEvals {
		s.fail(c, http.StatusRequestEntityTooLarge, codeTooLarge, fmt.Sprintf("%d evaluations, at most %d in one request", len(req.Evaluations), s.maxEvals))
		return
	}
	items := make([]tuple, len(req.Evaluations))
	for i, e := range req.Evaluations {
		items[i] = e.merged(req.tuple)
		if err := items[i].validate(fmt.Sprintf("evaluations[%d].", i)); err != nil {
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error()+" (in the item or as a top-level default)")
			return
		}
	}
	out := make([]evaluationResponse, 0, len(items))
	recs := make([]Record, 0, len(items))
	for i, t := range items {
		resp, rec := s.evaluate(ctx, c, snap, t, i)
		out, recs = append(out, resp), append(recs, rec)
		if (semantic == DenyOnFirstDeny && !resp.Decision) || (semantic == PermitOnFirstPermit && resp.Decision) {
			break
		}
	}
	if !s.audit(c, recs...) {
		return
	}
	writeJSON(c.w, http.StatusOK, map[string]any{"evaluations": out}, false)
}

func (s *Server) decodeRequest(body []byte, v any) error {
	if body == nil {
		return errors.New("request body is empty: want a JSON object")
	}
	return decodeStrict(body, v)
}

// evaluate decides one tuple on snap; every failure is a deny whose
// context says why in general terms.
func (s *Server) evaluate(ctx context.Context, c *call, snap policy.Snapshot, t tuple, item int) (evaluationResponse, Record) {
	in := t.input(c.caller)
	rec := s.record(c, c.r.URL.Path, item, digest(in))
	rec.PolicyRevision = snap.Revision()
	deny := func(cause, reason string, context map[string]any) (evaluationResponse, Record) {
		rec.Result, rec.Cause, rec.Reason = ResultDeny, cause, reason
		return evaluationResponse{Decision: false, Context: context}, rec
	}
	v, err := ast.InterfaceToValue(in)
	if err != nil {
		return deny(CausePolicyError, "build input: "+err.Error(), errorContext(http.StatusInternalServerError, "the request could not be turned into policy input"))
	}
	res, err := snap.Eval(ctx, v)
	if err != nil {
		if ctx.Err() != nil {
			return deny(CausePolicyError, err.Error(), errorContext(http.StatusServiceUnavailable, "policy evaluation timed out"))
		}
		return deny(CausePolicyError, err.Error(), errorContext(http.StatusInternalServerError, "policy evaluation failed"))
	}
	rec.MatchedRules = res.Rules
	if !res.Defined {
		return deny(CauseUndefined, "the decision is undefined", nil)
	}
	decision, context, err := mapDecision(res.Value)
	if err != nil {
		return deny(CauseInvalidDecision, err.Error(), errorContext(http.StatusInternalServerError, "the policy returned an invalid decision"))
	}
	rec.Cause = CausePolicy
	rec.Result = ResultDeny
	rec.Reason = "policy denied"
	if decision {
		rec.Result, rec.Reason = ResultAllow, "policy allowed"
	}
	return evaluationResponse{Decision: decision, Context: context}, rec
}

// mapDecision reads a policy answer: a boolean, or an object with a boolean
// "decision" and an optional object "context".
func mapDecision(v any) (bool, map[string]any, error) {
	switch d := v.(type) {
	case bool:
		return d, nil, nil
	case map[string]any:
		b, ok := d["decision"].(bool)
		if !ok {
			return false, nil, errors.New(`decision object needs a boolean "decision"`)
		}
		for k := range d {
			if k != "decision" && k != "context" {
				return false, nil, fmt.Errorf("decision object has unknown key %q", k)
			}
		}
		cv, has := d["context"]
		if !has {
			return b, nil, nil
		}
		ctx, ok := cv.(map[string]any)
		if !ok {
			return false, nil, errors.New(`decision "context" must be an object`)
		}
		return b, ctx, nil
	default:
		return false, nil, fmt.Errorf("decision is %T, want a boolean or an object", v)
	}
}

func errorContext(status int, msg string) map[string]any {
	return map[string]any{"error": map[string]any{"status": status, "message": msg}}
}

// metadata serves the PDP metadata. It is public: it names endpoints only.
func (s *Server) metadata(w http.ResponseWriter, r *http.Request) {
	base := s.baseURL
	if base == "" {
		if !validHost(r.Host) {
			writeJSON(w, http.StatusBadRequest, apiError{Code: codeInvalidParameter, Message: "invalid Host header"}, false)
			return
		}
		scheme := "https"
		if r.TLS == nil {
			scheme = "http"
		}
		base = scheme + "://" + r.Host
	}
	writeJSON(w, http.StatusOK, map[string]string{
		"policy_decision_point":       base,
		"access_evaluation_endpoint":  base + "/access/v1/evaluation",
		"access_evaluations_endpoint": base + "/access/v1/evaluations",
		"search_subject_endpoint":     base + "/access/v1/search/subject",
		"search_resource_endpoint":    base + "/access/v1/search/resource",
		"search_action_endpoint":      base + "/access/v1/search/action",
	}, false)
}

func validHost(h string) bool {
	if h == "" || len(h) > 255 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(".-:[]_", c) >= 0) {
			return false
		}
	}
	return true
}
