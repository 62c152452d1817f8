-- Mesh configuration (Service, Route, TrafficPolicy, AuthorizationPolicy)
-- with its revision history, and the service registry fed by xDS clients.

-- The current state: one row per live resource. revision counts the
-- resource's own changes; generation is the mesh-wide change counter at
-- which it last changed.
CREATE TABLE mesh_resources (
    kind       text NOT NULL,
    namespace  text NOT NULL,
    name       text NOT NULL,
    revision   bigint NOT NULL,
    generation bigint NOT NULL,
    resource   jsonb NOT NULL,
    author     text NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);

-- Every change, kept: op is apply, delete or rollback; resource is the
-- content after the change (NULL after a delete); diff is a line diff of
-- the YAML before and after.
CREATE TABLE mesh_revisions (
    kind       text NOT NULL,
    namespace  text NOT NULL,
    name       text NOT NULL,
    revision   bigint NOT NULL,
    generation bigint NOT NULL,
    op         text NOT NULL CHECK (op IN ('apply', 'delete', 'rollback')),
    resource   jsonb,
    diff       text NOT NULL,
    author     text NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (kind, namespace, name, revision)
);

-- The mesh-wide generation: one row, bumped by every change in the
-- transaction that makes it (which also serializes writers).
CREATE TABLE mesh_generation (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    generation bigint NOT NULL
);
INSERT INTO mesh_generation (generation) VALUES (0);

-- Workloads registered through their xDS node metadata. A row lives while
-- any replica holds a stream from the node, and for a grace period after
-- (expires_at); spiffe_id binds the node id to the identity that claimed it.
-- healthy turns true once the node has ACKed configuration that includes
-- its own inbound listeners, i.e. once it can serve; until then clients do
-- not send it traffic. updated_at is refreshed by the replica holding the
-- stream, so a crashed replica's registrations go stale.
CREATE TABLE mesh_endpoints (
    node_id    text PRIMARY KEY,
    spiffe_id  text NOT NULL,
    service    text NOT NULL,
    namespace  text NOT NULL,
    labels     jsonb NOT NULL,
    address    text NOT NULL,
    ports      jsonb NOT NULL,
    replica    text NOT NULL,
    healthy    boolean NOT NULL DEFAULT false,
    expires_at timestamptz,
    updated_at timestamptz NOT NULL
);
CREATE INDEX mesh_endpoints_service ON mesh_endpoints (namespace, service);
