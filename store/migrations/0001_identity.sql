-- Identity: the certificate authority's shared state, node attestation,
-- registration entries, and the record of every identity ever issued.

-- Roots of trust. A self-managed root keeps its private key sealed with the
-- operator's key-encryption key; an upstream (step-ca) root has no key here.
-- Lifecycle: prepared (published in the bundle, signs nothing) -> active
-- (signs intermediates) -> retiring (still published, signs nothing, waits
-- for what it signed to expire) -> retired (gone from the bundle).
CREATE TABLE ca_roots (
    id           text PRIMARY KEY,            -- hex SHA-256 of cert_der
    cert_der     bytea NOT NULL,
    key_sealed   bytea,
    upstream     boolean NOT NULL DEFAULT false,
    state        text NOT NULL CHECK (state IN ('prepared', 'active', 'retiring', 'retired')),
    not_after    timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz,
    retiring_at  timestamptz,
    retired_at   timestamptz
);
CREATE UNIQUE INDEX ca_roots_one_active ON ca_roots ((true)) WHERE state = 'active';

-- Signing intermediates, one live per writd replica. Their keys live only
-- in that replica's memory; the certificate is kept so that rotation and
-- retirement can reason about what each root has signed.
CREATE TABLE ca_intermediates (
    serial     text PRIMARY KEY,
    replica_id text NOT NULL,
    root_id    text REFERENCES ca_roots (id),
    cert_der   bytea NOT NULL,
    not_before timestamptz NOT NULL,
    not_after  timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ca_intermediates_root ON ca_intermediates (root_id, not_after);

-- JWT-SVID signing keys (public halves). A key is published from created_at
-- and signs from active_at, so every verifier has it before it is used.
CREATE TABLE jwt_keys (
    kid            text PRIMARY KEY,
    public_key_der bytea NOT NULL,           -- PKIX
    replica_id     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    active_at      timestamptz NOT NULL,
    not_after      timestamptz NOT NULL
);

-- The bundle's spiffe_sequence: bumped whenever its content changes.
CREATE TABLE bundle_state (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    sequence   bigint NOT NULL,
    digest     bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One-time join tokens. Only the SHA-256 of a token is stored.
CREATE TABLE join_tokens (
    token_hash bytea PRIMARY KEY,
    spiffe_id  text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    used_at    timestamptz,
    used_by    text
);

-- Attested nodes (agents).
CREATE TABLE nodes (
    spiffe_id      text PRIMARY KEY,
    attestation    text NOT NULL,
    attested_at    timestamptz NOT NULL,
    svid_serial    text,
    svid_not_after timestamptz,
    last_seen      timestamptz,
    banned         boolean NOT NULL DEFAULT false
);

-- Registration entries: which workloads on which node get which SPIFFE ID.
CREATE TABLE registration_entries (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    spiffe_id        text NOT NULL,
    parent_id        text NOT NULL,
    selectors        text[] NOT NULL CHECK (cardinality(selectors) > 0),
    x509_ttl_seconds integer CHECK (x509_ttl_seconds > 0),
    jwt_ttl_seconds  integer CHECK (jwt_ttl_seconds > 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       text NOT NULL,
    UNIQUE (parent_id, spiffe_id, selectors)
);
CREATE INDEX registration_entries_parent ON registration_entries (parent_id);

-- Every issuance, renewal, token use and refusal.
CREATE TABLE issuance_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    kind      text NOT NULL CHECK (kind IN ('x509-svid', 'jwt-svid', 'node-svid', 'intermediate', 'join-token')),
    outcome   text NOT NULL CHECK (outcome IN ('issued', 'renewed', 'used', 'refused')),
    serial    text,
    spiffe_id text,
    not_after timestamptz,
    node_id   text,
    entry_id  uuid,
    caller    text,
    signer    text,                           -- serial of the signing intermediate
    reason    text
);
CREATE INDEX issuance_log_at ON issuance_log (at);
CREATE INDEX issuance_log_spiffe_id ON issuance_log (spiffe_id, at);
CREATE INDEX issuance_log_signer ON issuance_log (signer, not_after);

-- Every call to the admin API, with the caller the socket vouched for.
CREATE TABLE admin_events (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,                     -- e.g. "uid:1000"
    uid    integer,
    pid    integer,
    method text NOT NULL,
    path   text NOT NULL,
    status integer NOT NULL,
    detail jsonb
);
CREATE INDEX admin_events_at ON admin_events (at);
