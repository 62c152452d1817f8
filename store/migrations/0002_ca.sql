-- CA rotation bookkeeping.

-- Upstream (step-ca) roots are all active at once: the one-active rule is
-- for self-managed roots, which sign intermediates here. At most one root
-- waits in 'prepared', so two root rotations never overlap.
DROP INDEX ca_roots_one_active;
CREATE UNIQUE INDEX ca_roots_one_active ON ca_roots ((true)) WHERE state = 'active' AND NOT upstream;
CREATE UNIQUE INDEX ca_roots_one_prepared ON ca_roots ((true)) WHERE state = 'prepared';

-- An intermediate is retired when its replica replaces it (rotation) or
-- stops; from then on it signs nothing, and last_leaf_not_after is the
-- latest expiry of anything it signed. A root is retired only once every
-- intermediate under it is retired or expired and those leaves have expired.
ALTER TABLE ca_intermediates
    ADD COLUMN retired_at          timestamptz,
    ADD COLUMN last_leaf_not_after timestamptz;
