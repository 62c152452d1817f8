# Access from JWT claims. The caller sends "Authorization: Bearer <JWT>";
# the token must verify against the JWKS in data.writ.jwt.jwks, come from
# data.writ.jwt.issuer, be meant for data.writ.jwt.audience and be unexpired.
# Each rule in data.writ.jwt.rules grants methods and path globs to holders
# of one role in the token's "roles" claim (or scope in its space-separated
# "scope" claim). Upstream receives the subject in x-jwt-subject, never
# the token.
package envoy.authz

http_request := input.attributes.request.http

default allow := {"allowed": false, "http_status": 401, "headers": {"www-authenticate": "Bearer"}}

allow := {
	"allowed": true,
	"headers": {"x-jwt-subject": claims.sub},
	"request_headers_to_remove": ["authorization"],
} if {
	granted
}

allow := {"allowed": false, "http_status": 403} if {
	claims
	not granted
}

bearer := token if {
	[scheme, token] := split(http_request.headers.authorization, " ")
	lower(scheme) == "bearer"
}

claims := payload if {
	[valid, _, payload] := io.jwt.decode_verify(bearer, {
		"cert": json.marshal(data.writ.jwt.jwks),
		"iss": data.writ.jwt.issuer,
		"aud": data.writ.jwt.audience,
	})
	valid
}

grants contains role if some role in claims.roles

grants contains scope if some scope in split(claims.scope, " ")

granted if {
	some rule in data.writ.jwt.rules
	rule.grant in grants
	method_ok(rule.methods, http_request.method)
	some pattern in rule.paths
	glob.match(pattern, ["/"], split(http_request.path, "?")[0])
}

method_ok(methods, _) if "*" in methods

method_ok(methods, method) if method in methods
