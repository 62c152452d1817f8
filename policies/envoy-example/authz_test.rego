package envoy.authz_test

import data.envoy.authz

token(claims) := io.jwt.encode_sign(
	{"typ": "JWT", "alg": "HS256"},
	object.union({"exp": 4102444800}, claims),
	{"kty": "oct", "k": base64url.encode_no_pad("example-secret-change-me")},
)

req(method, path, tok, extra) := object.union(
	{
		"attributes": {"request": {"http": {"method": method, "path": path, "headers": {"authorization": concat(" ", ["Bearer", tok])}}}},
		"parsed_path": split(trim_left(split(path, "?")[0], "/"), "/"),
		"parsed_query": {},
	},
	extra,
)

reader := token({"sub": "rita", "roles": []})

editor := token({"sub": "ed", "roles": ["editor"]})

admin := token({"sub": "ada", "roles": ["admin"]})

test_read_allowed_with_subject_header if {
	d := authz.allow with input as req("GET", "/books/12", reader, {})
	d.allowed == true
	d.headers["x-subject"] == "rita"
	d.request_headers_to_remove == ["authorization"]
}

test_no_token_is_401 if {
	d := authz.allow with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/books/1", "headers": {}}}}}
	d.allowed == false
	d.http_status == 401
}

test_wrong_secret_is_401 if {
	forged := io.jwt.encode_sign({"typ": "JWT", "alg": "HS256"}, {"sub": "eve", "roles": ["admin"], "exp": 4102444800}, {"kty": "oct", "k": base64url.encode_no_pad("guess")})
	d := authz.allow with input as req("GET", "/books/1", forged, {})
	d.http_status == 401
}

test_expired_token_is_401 if {
	old := token({"sub": "rita", "exp": 1000})
	d := authz.allow with input as req("GET", "/books/1", old, {})
	d.http_status == 401
}

test_reader_cannot_post_403 if {
	d := authz.allow with input as req("POST", "/books", reader, {"parsed_body": {"title": "Dune"}})
	d.allowed == false
	d.http_status == 403
	d.body == "rita may not POST /books"
}

test_editor_posts_titled_book if {
	d := authz.allow with input as req("POST", "/books", editor, {"parsed_body": {"title": "Dune"}})
	d.allowed
	e := authz.allow with input as req("POST", "/books", editor, {"parsed_body": {"title": ""}})
	not e.allowed
}

test_admin_delete_needs_confirmation if {
	d := authz.allow with input as req("DELETE", "/books/7?confirm=true", admin, {"parsed_query": {"confirm": ["true"]}})
	d.allowed
	e := authz.allow with input as req("DELETE", "/books/7", admin, {})
	not e.allowed
	f := authz.allow with input as req("DELETE", "/books/7?confirm=true", editor, {"parsed_query": {"confirm": ["true"]}})
	not f.allowed
}
