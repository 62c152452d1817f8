package writ.admin_test

import data.writ.admin

req(id, api, action, path) := {
	"caller": {"spiffe_id": id, "auth": "x509"},
	"api": api,
	"action": action,
	"method": "POST",
	"path": path,
}

app := "spiffe://cluster.local/ns/shop/sa/frontend"

ops := "spiffe://cluster.local/ns/ops/sa/policy-admin"

test_workload_may_use_authzen if {
	admin.allow with input as req(app, "authzen", "evaluate", "/access/v1/evaluation")
	admin.allow with input as req(app, "authzen", "evaluate", "/access/v1/evaluations")
}

test_workload_may_query_the_decision_rules if {
	admin.allow with input as req(app, "data", "evaluate", "envoy/authz/allow")
	admin.allow with input as req(app, "data", "evaluate", "writ/authzen/decision")
}

test_workload_may_not_read_other_data if {
	not admin.allow with input as req(app, "data", "evaluate", "writ/decision_api/grants")
	not admin.allow with input as req(app, "data", "evaluate", "")
	not admin.allow with input as req(app, "data", "evaluate", "envoy/authz")
	not admin.allow with input as req(app, "data", "evaluate", "envoy/authz/allow/x")
}

test_workload_may_not_read_without_input if {
	not admin.allow with input as req(app, "data", "read", "envoy/authz/allow")
}

test_policy_admin_reads_everything if {
	admin.allow with input as req(ops, "data", "read", "")
	admin.allow with input as req(ops, "data", "read", "writ/decision_api/grants")
	admin.allow with input as req(ops, "data", "evaluate", "a/b/c/d")
}

test_ids_outside_the_grants_are_denied if {
	not admin.allow with input as req("spiffe://other.org/ns/shop/sa/frontend", "authzen", "evaluate", "/access/v1/evaluation")
	not admin.allow with input as req("spiffe://cluster.local/node/n1", "authzen", "evaluate", "/access/v1/evaluation")
	not admin.allow with input as req("spiffe://cluster.local/ns/shop/sa/frontend/extra", "authzen", "evaluate", "/access/v1/evaluation")
}

test_unknown_api_or_action_denied if {
	not admin.allow with input as req(app, "bundles", "evaluate", "x")
	not admin.allow with input as req(app, "authzen", "read", "/access/v1/evaluation")
}

test_empty_input_denied if {
	not admin.allow with input as {}
}

enforcer := "spiffe://cluster.local/ns/writ-system/sa/writ-enforcer"

test_mesh_components_may_read_the_mesh_bundle if {
	admin.allow with input as req(enforcer, "bundles", "read", "mesh")
	not admin.allow with input as req(enforcer, "bundles", "read", "other")
	not admin.allow with input as req(enforcer, "bundles", "evaluate", "mesh")
}

test_workloads_may_not_read_bundles if {
	not admin.allow with input as req(app, "bundles", "read", "mesh")
	not admin.allow with input as req(ops, "bundles", "read", "mesh")
}
