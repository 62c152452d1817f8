package decision

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/open-policy-agent/opa/v1/ast"

	"github.com/writmesh/writ/policy"
)

// Search kinds: which part of the tuple an AuthZEN search enumerates.
const (
	searchSubject  = "subject"
	searchResource = "resource"
	searchAction   = "action"
)

// Bounds of a search: the candidates the policy may offer, and the page
// size when the caller gives none (and the most it may ask for).
const (
	maxSearchCandidates = 10000
	defaultSearchLimit  = 100
	maxSearchLimit      = 1000
)

// ResultSearched is the Result of a search's record: its Reason says how
// many candidates were allowed.
const ResultSearched = "searched"

type searchPage struct {
	Token *string      `json:"token,omitempty"`
	Limit *json.Number `json:"limit,omitempty"`
}

type searchRequest struct {
	tuple
	Page *searchPage `json:"page"`
}

// searchInput is the input of the candidates query: the request's tuple
// with the searched part reduced to what the caller gave, and
// input.search naming the kind.
func (t tuple) searchInput(kind string, c Caller) map[string]any {
	ctx := t.Context
	if ctx == nil {
		ctx = map[string]any{}
	}
	in := map[string]any{"search": kind, "context": ctx, "writ": map[string]any{"api": APIAuthZEN, "caller": c.input()}}
	ent := func(e *entity) map[string]any {
		m := map[string]any{}
		if e.Type != nil {
			m["type"] = *e.Type
		}
		if e.ID != nil {
			m["id"] = *e.ID
		}
		if e.Properties != nil {
			m["properties"] = e.Properties
		}
		return m
	}
	if t.Subject != nil {
		in["subject"] = ent(t.Subject)
	}
	if t.Resource != nil {
		in["resource"] = ent(t.Resource)
	}
	if t.Action != nil {
		a := map[string]any{}
		if t.Action.Name != nil {
			a["name"] = *t.Action.Name
		}
		if t.Action.Properties != nil {
			a["properties"] = t.Action.Properties
		}
		in["action"] = a
	}
	return in
}

// search serves POST /access/v1/search/{subject,resource,action}: the
// policy's candidates for the searched part (data.PKG.candidates beside
// the decision rule, given input.search and the rest of the request), each
// decided like an evaluation; the allowed ones are the results, in a
// stable order, paged. Results therefore never disagree with evaluations.
func (s *Server) search(kind string) func(c *call) {
	return func(c *call) {
		if !s.authorize(c, "evaluate", c.r.URL.Path) {
			return
		}
		body, ok := s.readBody(c)
		if !ok {
			return
		}
		var req searchRequest
		if err := s.decodeRequest(body, &req); err != nil {
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
			return
		}
		if err := req.validateSearch(kind); err != nil {
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
			return
		}
		snap := s.engine.Snapshot()
		offset, limit, err := pageBounds(req.Page, snap.Revision())
		if err != nil {
			s.fail(c, http.StatusBadRequest, codeInvalidParameter, err.Error())
			return
		}
		in := req.searchInput(kind, c.caller)
		rec := s.record(c, c.r.URL.Path, 0, digest(in))
		rec.PolicyRevision = snap.Revision()
		cands, err := s.candidates(c, snap, in, kind, req.tuple)
		if err != nil {
			rec.Result, rec.Cause, rec.Reason = ResultError, CausePolicyError, err.Error()
			if s.audit(c, rec) {
				s.fail(c, http.StatusInternalServerError, codeInternal, "search candidates: "+err.Error())
			}
			return
		}
		var allowed []tuple
		for _, cand := range cands {
			resp, r := s.evaluate(c.ctx, c, snap, cand, 0)
			if r.Cause == CausePolicyError {
				rec.Result, rec.Cause, rec.Reason = ResultError, CausePolicyError, r.Reason
				if s.audit(c, rec) {
					s.fail(c, http.StatusInternalServerError, codeInternal, "policy evaluation failed")
				}
				return
			}
			if resp.Decision {
				allowed = append(allowed, cand)
			}
		}
		rec.Result, rec.Cause = ResultSearched, CausePolicy
		rec.Reason = fmt.Sprintf("%d of %d candidates allowed", len(allowed), len(cands))
		if !s.audit(c, rec) {
			return
		}
		results := []any{}
		end := min(offset+limit, len(allowed))
		for _, t := range allowed[min(offset, len(allowed)):end] {
			results = append(results, t.part(kind))
		}
		next := ""
		if end < len(allowed) {
			next = pageToken(end, snap.Revision())
		}
		writeJSON(c.w, http.StatusOK, map[string]any{"results": results, "page": map[string]any{"next_token": next}}, false)
	}
}

// validateSearch checks the members a search of kind needs: the searched
// part by type only (subject, resource) or not at all (action), the others
// whole.
func (t tuple) validateSearch(kind string) error {
	var missing []string
	need := func(ok bool, name string) {
		if !ok {
			missing = append(missing, name)
		}
	}
	whole := func(e *entity, name string, idToo bool) {
		need(e != nil, name)
		if e != nil {
			need(e.Type != nil && *e.Type != "", name+".type")
			if idToo {
				need(e.ID != nil && *e.ID != "", name+".id")
			}
		}
	}
	switch kind {
	case searchSubject:
		whole(t.Subject, "subject", false)
		whole(t.Resource, "resource", true)
		need(t.Action != nil && t.Action.Name != nil && *t.Action.Name != "", "action.name")
	case searchResource:
		whole(t.Subject, "subject", true)
		whole(t.Resource, "resource", false)
		need(t.Action != nil && t.Action.Name != nil && *t.Action.Name != "", "action.name")
	case searchAction:
		whole(t.Subject, "subject", true)
		whole(t.Resource, "resource", true)
	}
	if len(missing) > 0 {
		return fmt.Errorf("required and missing or empty: %s", strings.Join(missing, ", "))
	}
	return nil
}

// candidates asks the policy for the candidates of the searched part and
// makes the full tuple of each, keeping only candidates of the requested
// type, deduplicated and in a stable order.
func (s *Server) candidates(c *call, snap policy.Snapshot, in map[string]any, kind string, t tuple) ([]tuple, error) {
	v, err := ast.InterfaceToValue(in)
	if err != nil {
		return nil, err
	}
	path := s.engine.DecisionPath()
	path = append(path[:len(path)-1:len(path)-1], ast.StringTerm("candidates"))
	res, err := snap.EvalPath(c.ctx, path, v)
	if err != nil {
		return nil, err
	}
	if !res.Defined {
		return nil, nil
	}
	list, ok := res.Value.([]any)
	if !ok {
		return nil, fmt.Errorf("%s is %s, want a set or array", path, valueKind(res.Value))
	}
	if len(list) > maxSearchCandidates {
		return nil, fmt.Errorf("%s offers %d candidates, at most %d", path, len(list), maxSearchCandidates)
	}
	type keyed struct {
		key string
		t   tuple
	}
	var out []keyed
	seen := map[string]bool{}
	for _, e := range list {
		m, ok := e.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("%s holds %s, want objects", path, valueKind(e))
		}
		cand := t
		var key string
		switch kind {
		case searchAction:
			name, ok := m["name"].(string)
			if !ok || name == "" {
				return nil, fmt.Errorf("%s: action candidate without a name", path)
			}
			a := &action{Name: &name}
			if p, ok := m["properties"].(map[string]any); ok {
				a.Properties = p
			}
			cand.Action, key = a, name
		default:
			typ, _ := m["type"].(string)
			id, ok := m["id"].(string)
			if !ok || id == "" {
				return nil, fmt.Errorf("%s: %s candidate without an id", path, kind)
			}
			want := t.Subject
			if kind == searchResource {
				want = t.Resource
			}
			if typ != *want.Type {
				continue
			}
			ent := &entity{Type: &typ, ID: &id}
			if p, ok := m["properties"].(map[string]any); ok {
				ent.Properties = p
			}
			if kind == searchSubject {
				cand.Subject = ent
			} else {
				cand.Resource = ent
			}
			key = typ + "\x00" + id
		}
		if !seen[key] {
			seen[key] = true
			out = append(out, keyed{key, cand})
		}
	}
	slices.SortFunc(out, func(a, b keyed) int { return strings.Compare(a.key, b.key) })
	ts := make([]tuple, len(out))
	for i, k := range out {
		ts[i] = k.t
	}
	return ts, nil
}

// part is the searched part of t as a result.
func (t tuple) part(kind string) any {
	switch kind {
	case searchSubject:
		return map[string]any{"type": *t.Subject.Type, "id": *t.Subject.ID}
	case searchResource:
		return map[string]any{"type": *t.Resource.Type, "id": *t.Resource.ID}
	default:
		return map[string]any{"name": *t.Action.Name}
	}
}

// pageBounds reads the page request: the offset from the token, which is
// only valid for the policy revision that issued it (results may move
// when the policy does), and the limit.
func pageBounds(p *searchPage, revision string) (offset, limit int, err error) {
	limit = defaultSearchLimit
	if p == nil {
		return 0, limit, nil
	}
	if p.Limit != nil {
		n, err := strconv.Atoi(string(*p.Limit))
		if err != nil || n < 1 || n > maxSearchLimit {
			return 0, 0, fmt.Errorf("page.limit: want an integer from 1 to %d", maxSearchLimit)
		}
		limit = n
	}
	if p.Token != nil && *p.Token != "" {
		raw, err := base64.RawURLEncoding.DecodeString(*p.Token)
		off, rev, ok := strings.Cut(string(raw), ":")
		n, aerr := strconv.Atoi(off)
		if err != nil || !ok || aerr != nil || n < 0 {
			return 0, 0, fmt.Errorf("page.token: not a token this API issued")
		}
		if rev != tokenRevision(revision) {
			return 0, 0, fmt.Errorf("page.token: the policy changed since the first page; search again")
		}
		offset = n
	}
	return offset, limit, nil
}

func pageToken(offset int, revision string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.Itoa(offset) + ":" + tokenRevision(revision)))
}

func tokenRevision(r string) string {
	if len(r) > 16 {
		return r[:16]
	}
	return r
}

func valueKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "a boolean"
	case string:
		return "a string"
	case json.Number:
		return "a number"
	case []any:
		return "an array"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}
