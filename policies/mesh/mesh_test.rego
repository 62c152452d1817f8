package envoy.authz_test

import data.envoy.authz

req(src, dst) := {"writ": {"source": src, "destination": dst}}

frontend := {"trust_domain": "cluster.local", "namespace": "shop", "service_account": "frontend"}

orders := {"trust_domain": "cluster.local", "namespace": "shop", "service_account": "orders"}

payments := {"trust_domain": "cluster.local", "namespace": "shop", "service_account": "payments"}

test_listed_pair_allowed if {
	authz.allow with input as req(frontend, orders)
}

test_reverse_pair_denied if {
	not authz.allow with input as req(orders, frontend)
}

test_unlisted_pair_denied if {
	not authz.allow with input as req(frontend, payments)
}

test_trust_domain_pinned if {
	authz.allow with input as req(orders, payments)
	not authz.allow with input as req(object.union(orders, {"trust_domain": "evil.example"}), payments)
}

test_wildcards if {
	prom := {"trust_domain": "cluster.local", "namespace": "monitoring", "service_account": "prometheus"}
	authz.allow with input as req(prom, payments)
	not authz.allow with input as req(payments, prom)
}

test_no_identity_denied if {
	not authz.allow with input as req({}, orders)
	not authz.allow with input as {}
}

test_decision_is_false_not_undefined if {
	authz.allow == false with input as {}
}
