-- The audit trail (package audit, docs/audit.md).
--
-- One row per event, partitioned by day on the event's time. The collector
-- creates partitions ahead of time and for any day a batch needs;
-- retention drops whole partitions. The primary key includes the partition
-- key, as PostgreSQL requires; event ids are UUIDv7, and a re-sent event
-- has the same (time, id), so ON CONFLICT DO NOTHING makes inserts
-- idempotent.
CREATE TABLE audit_events (
    id              uuid        NOT NULL,
    time            timestamptz NOT NULL,
    kind            text        NOT NULL,
    source          text        NOT NULL,  -- SPIFFE ID of the recorder: the chain owner
    seq             bigint      NOT NULL,  -- per source, from 1
    prev_hash       bytea       NOT NULL,
    hash            bytea       NOT NULL,
    principal       text        NOT NULL,  -- who acted (the caller, the admin)
    destination     text        NOT NULL,  -- what was acted on
    action          text        NOT NULL,
    resource        text        NOT NULL,
    result          text        NOT NULL,
    status          integer     NOT NULL,
    reason          text        NOT NULL,
    cause           text        NOT NULL,
    policy_revision text        NOT NULL,
    trace_id        text        NOT NULL,
    attributes      jsonb       NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (time, id)
) PARTITION BY RANGE (time);

CREATE INDEX audit_events_time        ON audit_events USING brin (time);
CREATE INDEX audit_events_source_seq  ON audit_events (source, seq);
CREATE INDEX audit_events_principal   ON audit_events (principal, time);
CREATE INDEX audit_events_destination ON audit_events (destination, time);
CREATE INDEX audit_events_result      ON audit_events (result, time);
CREATE INDEX audit_events_policy_rev  ON audit_events (policy_revision, time);
CREATE INDEX audit_events_trace_id    ON audit_events (trace_id) WHERE trace_id <> '';

-- Append-only for everyone the trigger binds: UPDATE and DELETE are
-- refused row by row on every partition. Retention does not delete rows;
-- it detaches and drops whole partitions (DDL, which row triggers do not
-- see). Deployments should also run writd's collector as a role without
-- UPDATE, DELETE or TRUNCATE on these tables, and retention as a separate
-- owner role (docs/audit.md gives the REVOKE statements).
CREATE FUNCTION audit_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();

-- The highest sequence number committed per source: the collector checks
-- that a source's events continue its chain, and verify starts here.
CREATE TABLE audit_sources (
    source     text        PRIMARY KEY,
    last_seq   bigint      NOT NULL,
    last_hash  bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Checkpoints: the chain heads (per source: last seq, which is also the
-- count, and last hash) at a moment, signed by the writd replica that
-- wrote them with its control-plane SVID key. An attacker with write access
-- to the database who deletes a chain's tail and fixes audit_sources, or
-- rewrites a chain with recomputed hashes, cannot make the signed heads
-- match again without that key.
CREATE TABLE audit_checkpoints (
    id         bigserial   PRIMARY KEY,
    created_at timestamptz NOT NULL,
    signer     text        NOT NULL,  -- SPIFFE ID of the signing writd
    body       bytea       NOT NULL,  -- the signed JSON document
    signature  bytea       NOT NULL,  -- ECDSA (ASN.1) over SHA-256(body)
    cert_chain bytea[]     NOT NULL   -- the signer's SVID chain, leaf first (DER)
);
CREATE INDEX audit_checkpoints_created ON audit_checkpoints (created_at);

CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
