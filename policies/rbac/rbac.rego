# Role-based access by caller SPIFFE ID, method and path. Rules live in
# data.writ.rbac.rules, keyed by the caller's SPIFFE ID, so a request only
# visits its own caller's rules. A rule lists methods ("*" for any) and path
# globs, where "*" matches one path segment and "**" any number.
package envoy.authz

default allow := false

allow if {
	some rule in data.writ.rbac.rules[input.attributes.source.principal]
	method_allowed(rule.methods, input.attributes.request.http.method)
	some pattern in rule.paths
	glob.match(pattern, ["/"], request_path)
}

# The path without its query string; the enforcer has already normalized it.
request_path := split(input.attributes.request.http.path, "?")[0]

method_allowed(methods, _) if "*" in methods

method_allowed(methods, method) if method in methods
