# The default mesh policy: a request is allowed only when the pair of
# workloads it connects is listed in data.writ.mesh.allowed. Workloads are
# matched on the SPIFFE ID parts in input.writ, so a peer without an mTLS
# identity never matches. "*" in an entry matches any value; an entry that
# leaves trust_domain out matches any trust domain.
package envoy.authz

default allow := false

allow if {
	some pair in data.writ.mesh.allowed
	workload_matches(pair.source, input.writ.source)
	workload_matches(pair.destination, input.writ.destination)
}

workload_matches(want, got) if {
	part_matches(want.namespace, got.namespace)
	part_matches(want.service_account, got.service_account)
	part_matches(object.get(want, "trust_domain", "*"), got.trust_domain)
}

part_matches("*", _)

part_matches(want, got) if want == got
