# The AuthZEN interop "Todo" application's authorization, for the decision
# API (decision path data.writ.authzen.decision). Users and their roles are
# data (data.writ.todo.users, keyed by the subject id the application
# sends); the rules:
#
#   can_read_user, can_read_todos  any known user
#   can_create_todo                admins and editors
#   can_update_todo                evil geniuses any todo, editors their own
#   can_delete_todo                admins any todo, editors their own
#
# A todo is the caller's own when resource.properties.ownerID is the
# user's email. Anything else, unknown users included, is denied.
package writ.authzen

default decision := {"decision": false}

decision := {"decision": true} if allow

user := data.writ.todo.users[input.subject.id]

has_role(r) if r in user.roles

own if input.resource.properties.ownerID == user.email

default allow := false

allow if {
	input.action.name in {"can_read_user", "can_read_todos"}
	user
}

allow if {
	input.action.name == "can_create_todo"
	some r in {"admin", "editor"}
	has_role(r)
}

allow if {
	input.action.name == "can_update_todo"
	has_role("evil_genius")
}

allow if {
	input.action.name in {"can_update_todo", "can_delete_todo"}
	has_role("editor")
	own
}

allow if {
	input.action.name == "can_delete_todo"
	has_role("admin")
}

# Search candidates (see docs/decision-api.md): every user for a subject
# search, the actions of the application for an action search.
candidates contains {"type": "user", "id": id} if {
	input.search == "subject"
	some id, _ in data.writ.todo.users
}

candidates contains {"name": name} if {
	input.search == "action"
	some name in ["can_read_user", "can_read_todos", "can_create_todo", "can_update_todo", "can_delete_todo"]
}
