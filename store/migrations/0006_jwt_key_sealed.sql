-- JWT signing keys are kept sealed with the CA's key-encryption key (as the
-- root key is), so a restarted replica can sign with a key verifiers already
-- hold instead of waiting two bundle refresh hints for a new one. NULL for
-- keys made without a KEK (upstream mode).
ALTER TABLE jwt_keys ADD COLUMN key_sealed bytea;
