package envoy.authz_test

import data.envoy.authz

req(principal, method, path) := {"attributes": {
	"source": {"principal": principal},
	"request": {"http": {"method": method, "path": path}},
}}

frontend := "spiffe://cluster.local/ns/shop/sa/frontend"

admin := "spiffe://cluster.local/ns/ops/sa/admin"

test_frontend_reads_users if {
	authz.allow with input as req(frontend, "GET", "/api/v1/users/42")
	authz.allow with input as req(frontend, "GET", "/api/v1/users/42?verbose=1")
	authz.allow with input as req(frontend, "GET", "/api/v1/users/42/orders/7")
}

test_frontend_cannot_write_users if {
	not authz.allow with input as req(frontend, "PUT", "/api/v1/users/42")
	not authz.allow with input as req(frontend, "DELETE", "/api/v1/users/42/orders/7")
}

test_single_star_is_one_segment if {
	not authz.allow with input as req(frontend, "GET", "/api/v1/users/42/profile/photo")
}

test_frontend_posts_orders if {
	authz.allow with input as req(frontend, "POST", "/api/v1/users/42/orders")
}

test_admin_anything_under_admin if {
	authz.allow with input as req(admin, "DELETE", "/admin/cache/all")
	authz.allow with input as req(admin, "PATCH", "/api/v2/x/y/z")
	not authz.allow with input as req(admin, "GET", "/metrics")
}

test_unknown_caller_denied if {
	not authz.allow with input as req("spiffe://cluster.local/ns/shop/sa/other", "GET", "/api/v1/users/42")
	not authz.allow with input as req("", "GET", "/api/v1/users/42")
	not authz.allow with input as {}
}
