# A document store's AuthZEN policy for the decision API tests: owners may
# read and edit their documents, readers may read them.
package writ.authzen

default allow := false

allow if {
	input.action.name == "can_read"
	input.subject.id in data.docs[input.resource.id].readers
}

allow if {
	input.action.name in {"can_read", "can_edit"}
	input.subject.id == data.docs[input.resource.id].owner
}

# The department property of the subject grants reading of its documents.
allow if {
	input.action.name == "can_read"
	input.subject.properties.department == data.docs[input.resource.id].department
}

decision := {"decision": true} if {
	allow
	not slow
}

decision := {"decision": false, "context": {"reason": deny_reason}} if {
	not allow
	not slow
}

deny_reason := "resource not found" if not data.docs[input.resource.id]

else := "subject may not perform this action"

# A request that asks for it spins long enough to hit any sane timeout.
slow if input.context.spin == true

decision := true if {
	slow
	some i in numbers.range(1, 5000)
	some j in numbers.range(1, 5000)
	i * j < 0
}

# The caller as the policy sees it, for the data API tests.
caller := input.writ.caller
