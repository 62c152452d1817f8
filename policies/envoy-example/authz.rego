# An example in opa-envoy-plugin's input shape: a bookstore API behind
# Envoy. Callers present an HS256 bearer token; its "sub" and "roles"
# claims decide what they may do. The decision is an object so the policy
# can pass the subject upstream, strip the token, and explain denials.
package envoy.authz

http_request := input.attributes.request.http

default allow := {
	"allowed": false,
	"http_status": 401,
	"headers": {"www-authenticate": "Bearer"},
	"body": "missing or invalid bearer token",
}

allow := {
	"allowed": true,
	"headers": {"x-subject": claims.sub},
	"request_headers_to_remove": ["authorization"],
	"response_headers_to_add": {"x-bookstore-policy": "v1"},
	"dynamic_metadata": {"subject": claims.sub},
} if {
	permitted
}

allow := {
	"allowed": false,
	"http_status": 403,
	"body": sprintf("%s may not %s %s", [claims.sub, http_request.method, http_request.path]),
} if {
	claims
	not permitted
}

claims := payload if {
	[scheme, token] := split(http_request.headers.authorization, " ")
	lower(scheme) == "bearer"
	[valid, _, payload] := io.jwt.decode_verify(token, {"secret": data.bookstore.secret, "alg": "HS256"})
	valid
}

# Anyone with a valid token may read books.
permitted if {
	http_request.method == "GET"
	input.parsed_path[0] == "books"
}

# Editors may add books that have a title.
permitted if {
	http_request.method == "POST"
	input.parsed_path == ["books"]
	"editor" in claims.roles
	input.parsed_body.title != ""
}

# Admins may delete, but only with an explicit confirmation.
permitted if {
	http_request.method == "DELETE"
	glob.match("/books/*", ["/"], split(http_request.path, "?")[0])
	"admin" in claims.roles
	input.parsed_query.confirm == ["true"]
}
