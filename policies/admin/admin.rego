# What callers of the decision API may ask. The API evaluates
# data.writ.admin.allow once per request with
#
#   input.caller  the authenticated caller: spiffe_id, trust_domain, path,
#                 namespace and service_account (Istio-form IDs), auth
#                 ("x509" or "jwt")
#   input.api     "authzen", "data" or "bundles" (policy bundle downloads)
#   input.action  "evaluate" (POST) or "read" (GET of the data API, bundles)
#   input.method  the HTTP method
#   input.path    the AuthZEN endpoint path, the canonical data path
#                 ("envoy/authz/allow"; "" for all of data), or the bundle
#                 name
#
# Grants live in data.writ.decision_api.grants. A grant names callers by
# SPIFFE ID glob ("*" is one path segment, "**" any number), the APIs they
# may use, and for the data API the data paths (globs, "/"-separated) and
# optionally the actions, for bundles the bundle names (globs). Anything
# no grant allows is denied.
package writ.admin

default allow := false

allow if {
	some grant in data.writ.decision_api.grants
	caller_matches(grant)
	input.api in grant.apis
	api_allows(grant)
}

caller_matches(grant) if {
	some pattern in grant.callers
	glob.match(pattern, ["/"], input.caller.spiffe_id)
}

# AuthZEN: a grant of the API allows its evaluation endpoints.
api_allows(_) if {
	input.api == "authzen"
	input.action == "evaluate"
}

# Data API: the path must match one of the grant's paths, and the action
# one of its actions when it lists any.
api_allows(grant) if {
	input.api == "data"
	some pattern in grant.paths
	glob.match(pattern, ["/"], input.path)
	action_allowed(grant)
}

action_allowed(grant) if not grant.actions

action_allowed(grant) if input.action in grant.actions

# Bundles: only reading, and only the bundles the grant names.
api_allows(grant) if {
	input.api == "bundles"
	input.action == "read"
	some pattern in grant.paths
	glob.match(pattern, ["/"], input.path)
}
