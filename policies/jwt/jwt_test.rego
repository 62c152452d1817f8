package envoy.authz_test

import data.envoy.authz

# The private half of the JWKS in data.json: test use only.
signing_key := {"kty": "EC", "crv": "P-256", "kid": "test-1", "alg": "ES256", "x": "7HgcubKreRIolDtUTmr3hDqxN_fk7eQDV738txe4Qqc", "y": "Tdke2bIOAfe6Gl6a-OaztnxDzU07exdqFvxGkYZA-3o", "d": "NqdC3Fr5ecMe7dFSszAU1DwuukQEjmbUtVIVNQPjYN0"}

token(claims) := io.jwt.encode_sign(
	{"typ": "JWT", "alg": "ES256", "kid": "test-1"},
	object.union({"iss": "https://id.example.com", "aud": "orders", "sub": "alice", "exp": 4102444800}, claims),
	signing_key,
)

req(method, path, tok) := {"attributes": {"request": {"http": {
	"method": method,
	"path": path,
	"headers": {"authorization": concat(" ", ["Bearer", tok])},
}}}}

test_scope_reads if {
	d := authz.allow with input as req("GET", "/orders/7?x=1", token({"scope": "profile orders:read"}))
	d.allowed
	d.headers["x-jwt-subject"] == "alice"
	d.request_headers_to_remove == ["authorization"]
}

test_scope_cannot_write if {
	d := authz.allow with input as req("POST", "/orders", token({"scope": "orders:read"}))
	not d.allowed
	d.http_status == 403
}

test_role_writes if {
	d := authz.allow with input as req("POST", "/orders", token({"roles": ["clerk"]}))
	d.allowed
}

test_admin_anything if {
	d := authz.allow with input as req("DELETE", "/users/9", token({"roles": ["admin"]}))
	d.allowed
}

test_wrong_issuer_401 if {
	d := authz.allow with input as req("GET", "/orders", token({"iss": "https://evil.example", "roles": ["admin"]}))
	d.http_status == 401
}

test_wrong_audience_401 if {
	d := authz.allow with input as req("GET", "/orders", token({"aud": "payments", "roles": ["admin"]}))
	d.http_status == 401
}

test_expired_401 if {
	d := authz.allow with input as req("GET", "/orders", token({"exp": 1000, "roles": ["admin"]}))
	d.http_status == 401
}

test_missing_or_malformed_401 if {
	d := authz.allow with input as {"attributes": {"request": {"http": {"method": "GET", "path": "/orders", "headers": {}}}}}
	d.http_status == 401
	e := authz.allow with input as req("GET", "/orders", "not-a-jwt")
	e.http_status == 401
}

test_unsigned_token_401 if {
	none := concat(".", [
		base64url.encode_no_pad(`{"typ":"JWT","alg":"none"}`),
		base64url.encode_no_pad(`{"iss":"https://id.example.com","aud":"orders","roles":["admin"],"exp":4102444800}`),
		"",
	])
	d := authz.allow with input as req("GET", "/orders", none)
	d.http_status == 401
}
