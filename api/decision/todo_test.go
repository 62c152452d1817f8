package decision_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"testing"

	"github.com/writmesh/writ/api/decision"
)

// todoPolicy is the shipped AuthZEN interop "Todo" policy.
var todoPolicy = filepath.Join("..", "..", "policies", "authzen-todo")

// TestAuthZENTodoInterop replays the AuthZEN interop Todo scenario's kinds
// of request (told with this repository's own users: ada is admin and evil
// genius, ben and cy editors, dee and eli viewers) against the shipped
// policy through the evaluation endpoint, each with its expected decision.
func TestAuthZENTodoInterop(t *testing.T) {
	e := newEnv(t, envOptions{policyDir: todoPolicy})
	c := e.mtls(appID)
	users := []string{"u-ada", "u-ben", "u-cy", "u-dee", "u-eli"}
	email := func(u string) string { return u[2:] + "@todo.example" }
	type pair struct {
		subject, action, owner string
		want                   bool
	}
	var pairs []pair
	for _, u := range users {
		role := map[string]string{"u-ada": "admin", "u-ben": "editor", "u-cy": "editor", "u-dee": "viewer", "u-eli": "viewer"}[u]
		pairs = append(pairs,
			pair{u, "can_read_user", "", true},
			pair{u, "can_read_todos", "", true},
			pair{u, "can_create_todo", "", role != "viewer"},
		)
		for _, owner := range users {
			own := owner == u
			pairs = append(pairs,
				pair{u, "can_update_todo", email(owner), role == "admin" || (role == "editor" && own)},
				pair{u, "can_delete_todo", email(owner), role == "admin" || (role == "editor" && own)},
			)
		}
	}
	pairs = append(pairs, pair{"u-mallory", "can_read_todos", "", false}, pair{"u-ada", "can_share_todo", "", false})
	for _, p := range pairs {
		name := fmt.Sprintf("%s %s %s", p.subject, p.action, p.owner)
		body, _ := json.Marshal(map[string]any{
			"subject":  map[string]any{"type": "user", "id": p.subject},
			"action":   map[string]any{"name": p.action},
			"resource": map[string]any{"type": "todo", "id": "todo-1", "properties": map[string]any{"ownerID": p.owner}},
		})
		r := e.do(c, "POST", "/access/v1/evaluation", string(body), "")
		var got struct{ Decision bool }
		if r.status != http.StatusOK || json.Unmarshal(r.body, &got) != nil {
			t.Fatalf("%s: %d %s", name, r.status, r.body)
		}
		if got.Decision != p.want {
			t.Errorf("%s: decision %v, want %v", name, got.Decision, p.want)
		}
	}
}

// TestAuthZENSearch: the three search endpoints answer with the allowed
// members of the policy's candidates, in a stable order, paged with
// opaque tokens; bad requests get 400.
func TestAuthZENSearch(t *testing.T) {
	e := newEnv(t, envOptions{policyDir: todoPolicy})
	c := e.mtls(appID)
	type page struct {
		Results []map[string]string
		Page    struct {
			NextToken string `json:"next_token"`
		}
	}
	post := func(path, body string) page {
		t.Helper()
		r := e.do(c, "POST", path, body, "")
		var p page
		if r.status != http.StatusOK || json.Unmarshal(r.body, &p) != nil {
			t.Fatalf("%s %s: %d %s", path, body, r.status, r.body)
		}
		return p
	}
	ids := func(p page, key string) []string {
		var out []string
		for _, r := range p.Results {
			out = append(out, r[key])
		}
		return out
	}

	// Who may delete cy's todo: the admin and cy.
	got := post("/access/v1/search/subject", `{"subject": {"type": "user"}, "action": {"name": "can_delete_todo"},
		"resource": {"type": "todo", "id": "t1", "properties": {"ownerID": "cy@todo.example"}}}`)
	if fmt.Sprint(ids(got, "id")) != "[u-ada u-cy]" || got.Page.NextToken != "" || got.Results[0]["type"] != "user" {
		t.Fatalf("subject search: %+v", got)
	}
	// Paged, two at a time: who may read todos (everyone).
	var all []string
	body := `{"subject": {"type": "user"}, "action": {"name": "can_read_todos"}, "resource": {"type": "todo", "id": "t1"}, "page": {"limit": 2%s}}`
	token := ""
	for range 4 {
		extra := ""
		if token != "" {
			extra = fmt.Sprintf(`, "token": %q`, token)
		}
		p := post("/access/v1/search/subject", fmt.Sprintf(body, extra))
		all = append(all, ids(p, "id")...)
		if token = p.Page.NextToken; token == "" {
			break
		}
	}
	if fmt.Sprint(all) != "[u-ada u-ben u-cy u-dee u-eli]" {
		t.Fatalf("paged subject search: %v", all)
	}
	// What may ben do with his own todo, and with cy's.
	got = post("/access/v1/search/action", `{"subject": {"type": "user", "id": "u-ben"}, "resource": {"type": "todo", "id": "t1", "properties": {"ownerID": "ben@todo.example"}}}`)
	if fmt.Sprint(ids(got, "name")) != "[can_create_todo can_delete_todo can_read_todos can_read_user can_update_todo]" {
		t.Fatalf("action search, own todo: %+v", got)
	}
	got = post("/access/v1/search/action", `{"subject": {"type": "user", "id": "u-ben"}, "resource": {"type": "todo", "id": "t1", "properties": {"ownerID": "cy@todo.example"}}}`)
	if fmt.Sprint(ids(got, "name")) != "[can_create_todo can_read_todos can_read_user]" {
		t.Fatalf("action search, other's todo: %+v", got)
	}
	// The policy offers no resource candidates: an empty result.
	got = post("/access/v1/search/resource", `{"subject": {"type": "user", "id": "u-ben"}, "action": {"name": "can_read_todos"}, "resource": {"type": "todo"}}`)
	if len(got.Results) != 0 {
		t.Fatalf("resource search: %+v", got)
	}
	recs := e.sink.records()
	if last := recs[len(recs)-1]; last.Result != decision.ResultSearched || last.Reason != "0 of 0 candidates allowed" {
		t.Fatalf("search record %+v", last)
	}

	for _, tc := range []struct{ name, path, body string }{
		{"subject search needs the action", "/access/v1/search/subject", `{"subject": {"type": "user"}, "resource": {"type": "todo", "id": "t1"}}`},
		{"action search needs the subject id", "/access/v1/search/action", `{"subject": {"type": "user"}, "resource": {"type": "todo", "id": "t1"}}`},
		{"forged token", "/access/v1/search/subject", `{"subject": {"type": "user"}, "action": {"name": "can_read_todos"}, "resource": {"type": "todo", "id": "t1"}, "page": {"token": "bm9wZQ"}}`},
		{"limit too large", "/access/v1/search/subject", `{"subject": {"type": "user"}, "action": {"name": "can_read_todos"}, "resource": {"type": "todo", "id": "t1"}, "page": {"limit": 100000}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if r := e.do(c, "POST", tc.path, tc.body, ""); r.status != http.StatusBadRequest {
				t.Fatalf("%d %s, want 400", r.status, r.body)
			}
		})
	}
}
