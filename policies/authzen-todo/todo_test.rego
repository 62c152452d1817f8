package writ.authzen_test

import data.writ.authzen

ask(subject, action, owner) := {
	"subject": {"type": "user", "id": subject},
	"action": {"name": action},
	"resource": {"type": "todo", "id": "t1", "properties": {"ownerID": owner}},
}

test_everyone_reads if {
	every s in ["u-ada", "u-ben", "u-dee"] {
		authzen.decision.decision with input as ask(s, "can_read_todos", "")
		authzen.decision.decision with input as ask(s, "can_read_user", "")
	}
}

test_unknown_user_denied if {
	not authzen.decision.decision with input as ask("u-nobody", "can_read_todos", "")
}

test_create if {
	authzen.decision.decision with input as ask("u-ada", "can_create_todo", "")
	authzen.decision.decision with input as ask("u-ben", "can_create_todo", "")
	not authzen.decision.decision with input as ask("u-dee", "can_create_todo", "")
}

test_update if {
	authzen.decision.decision with input as ask("u-ada", "can_update_todo", "ben@todo.example")
	authzen.decision.decision with input as ask("u-ben", "can_update_todo", "ben@todo.example")
	not authzen.decision.decision with input as ask("u-ben", "can_update_todo", "cy@todo.example")
	not authzen.decision.decision with input as ask("u-dee", "can_update_todo", "dee@todo.example")
}

test_delete if {
	authzen.decision.decision with input as ask("u-ada", "can_delete_todo", "cy@todo.example")
	authzen.decision.decision with input as ask("u-cy", "can_delete_todo", "cy@todo.example")
	not authzen.decision.decision with input as ask("u-cy", "can_delete_todo", "ben@todo.example")
	not authzen.decision.decision with input as ask("u-eli", "can_delete_todo", "eli@todo.example")
}

test_unknown_action_denied if {
	not authzen.decision.decision with input as ask("u-ada", "can_fly", "")
}
