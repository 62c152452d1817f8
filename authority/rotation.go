package authority

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// RotationPhase is where a root rotation stands.
type RotationPhase string

// Root rotation phases.
const (
	// RotationIdle: no rotation has ever run.
	RotationIdle RotationPhase = "idle"
	// RotationPrepared: the new root is in the bundle and signs nothing yet.
	RotationPrepared RotationPhase = "prepared"
	// RotationSwitched: the new root signs intermediates; the old one is
	// still in the bundle until nothing it signed can be valid.
	RotationSwitched RotationPhase = "switched"
	// RotationDone: the old root has left the bundle.
	RotationDone RotationPhase = "done"
)

// ErrRotationInProgress refuses a second root rotation while one runs.
var ErrRotationInProgress = errors.New("a root rotation is already in progress")

// RootRotation reports a root rotation.
type RootRotation struct {
	Phase RotationPhase
	// ActiveRootID is the root that signs intermediates now.
	ActiveRootID string
	// OldRootID is the root being (or last) replaced; NewRootID the one
	// replacing it. Both are empty when Phase is idle.
	OldRootID, NewRootID string
	// StartedAt is when the new root was created.
	StartedAt time.Time
	// NextStepAt is the earliest time of the next step: the switch when
	// prepared, the old root's retirement when switched (it moves later if
	// a replica has not switched yet, as it is bounded by what that replica
	// may still sign). Zero when idle or done.
	NextStepAt time.Time
	// CompletedAt is when the old root was retired, when done.
	CompletedAt time.Time
}

// RotateRoot starts a root rotation: it creates a new root, sealed with the
// KEK, in the prepared state, so it is in the trust bundle but signs
// nothing. Run (on any replica) then advances it; see advanceRootRotation
// for the rule. It fails if a rotation is already in progress or the CA has
// an upstream root. It is safe for concurrent use.
func (c *CA) RotateRoot(ctx context.Context) (RootRotation, error) {
	if c.upstream != nil {
		return RootRotation{}, errors.New("rotate root: the root is managed by the upstream CA")
	}
	now := c.clock.Now()
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", caLockKey); err != nil {
			return fmt.Errorf("take ca lock: %w", err)
		}
		var busy string
		err := tx.QueryRow(ctx, "SELECT state FROM ca_roots WHERE state IN ('prepared', 'retiring') AND NOT upstream LIMIT 1").Scan(&busy)
		if err == nil {
			return fmt.Errorf("%w (a root is %s); wait for it to finish", ErrRotationInProgress, busy)
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("read roots: %w", err)
		}
		r, err := c.generateRoot(now)
		if err != nil {
			return err
		}
		if err := c.insertRoot(ctx, tx, r, "prepared", now); err != nil {
			return err
		}
		c.rootsMu.Lock()
		c.roots[r.id] = r
		c.rootsMu.Unlock()
		c.log.Info("root rotation started: new root published, not signing yet", logRoot, r.id)
		return nil
	})
	if err != nil {
		return RootRotation{}, fmt.Errorf("rotate root: %w", err)
	}
	if err := c.refreshBundle(ctx); err != nil {
		return RootRotation{}, fmt.Errorf("rotate root: %w", err)
	}
	return c.RootRotationStatus(ctx)
}

// RootRotationStatus reports the current or last root rotation. It is safe
// for concurrent use.
func (c *CA) RootRotationStatus(ctx context.Context) (RootRotation, error) {
	var st RootRotation
	if c.upstream != nil {
		st.Phase = RotationIdle
		return st, nil
	}
	rows, err := c.pool.Query(ctx, `SELECT id, state, created_at, retiring_at, retired_at FROM ca_roots WHERE NOT upstream ORDER BY created_at DESC`)
	if err != nil {
		return st, fmt.Errorf("root rotation status: %w", err)
	}
	type row struct {
		id, state             string
		created               time.Time
		retiringAt, retiredAt *time.Time
	}
	var prepared, active, retiring, lastRetired *row
	for rows.Next() {
		var r row
		if err := rows.Scan(&r.id, &r.state, &r.created, &r.retiringAt, &r.retiredAt); err != nil {
			rows.Close()
			return st, fmt.Errorf("root rotation status: %w", err)
		}
		switch r.state {
		case "prepared":
			prepared = &r
		case "active":
			active = &r
		case "retiring":
			retiring = &r
		case "retired":
			if lastRetired == nil || (r.retiredAt != nil && lastRetired.retiredAt != nil && r.retiredAt.After(*lastRetired.retiredAt)) {
				lastRetired = &r
			}
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return st, fmt.Errorf("root rotation status: %w", err)
	}
	if active != nil {
		st.ActiveRootID = active.id
	}
	switch {
	case prepared != nil:
		st.Phase = RotationPrepared
		st.NewRootID, st.StartedAt = prepared.id, prepared.created
		st.NextStepAt = prepared.created.Add(c.set.publishDelay())
		if active != nil {
			st.OldRootID = active.id
		}
	case retiring != nil:
		st.Phase = RotationSwitched
		st.OldRootID = retiring.id
		if active != nil {
			st.NewRootID, st.StartedAt = active.id, active.created
		}
		at, err := c.retireAt(ctx, c.pool, retiring.id, *retiring.retiringAt)
		if err != nil {
			return st, fmt.Errorf("root rotation status: %w", err)
		}
		st.NextStepAt = at
	case lastRetired != nil:
		st.Phase = RotationDone
		st.OldRootID = lastRetired.id
		if active != nil {
			st.NewRootID, st.StartedAt = active.id, active.created
		}
		if lastRetired.retiredAt != nil {
			st.CompletedAt = *lastRetired.retiredAt
		}
	default:
		st.Phase = RotationIdle
	}
	return st, nil
}

// retireAt is the earliest time the retiring root may leave the bundle:
// when nothing chaining to it can still be valid. For each intermediate it
// signed, that is the intermediate's own expiry while it is still in use
// (its replica has not switched yet, or died without saying so), and once
// it is retired the latest expiry of the leaves it signed (as its replica
// recorded, or as issuance_log shows). It is never before the root began
// retiring.
func (c *CA) retireAt(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, rootID string, retiringAt time.Time) (time.Time, error) {
	var bound *time.Time
	err := q.QueryRow(ctx, `
		SELECT max(CASE WHEN i.retired_at IS NULL THEN i.not_after
		                ELSE least(i.not_after, greatest(i.retired_at, i.last_leaf_not_after, l.max_not_after)) END)
		FROM ca_intermediates i
		LEFT JOIN LATERAL (
			SELECT max(not_after) AS max_not_after FROM issuance_log
			WHERE signer = i.serial AND kind IN ('x509-svid', 'node-svid') AND outcome <> 'refused'
		) l ON true
		WHERE i.root_id = $1`, rootID).Scan(&bound)
	if err != nil {
		return time.Time{}, fmt.Errorf("bound leaves of root %s: %w", rootID, err)
	}
	if bound == nil || bound.Before(retiringAt) {
		return retiringAt, nil
	}
	return *bound, nil
}

// advanceRootRotation moves a root rotation forward; any replica may do it,
// one at a time under the CA advisory lock. The rule:
//
//   - prepared -> active once the new root has been in the bundle for two
//     bundle refresh hints (every replica's cached bundle and every
//     verifier's fetched bundle then holds it); at the same moment the old
//     active root becomes retiring. Each replica, at its next poll, sees
//     its intermediate is under a root that is no longer active and
//     replaces it with one signed by the new root.
//   - retiring -> retired (out of the bundle) once nothing it signed can
//     still be valid: see retireAt.
func (c *CA) advanceRootRotation(ctx context.Context) error {
	now := c.clock.Now()
	changed := false
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", caLockKey); err != nil {
			return fmt.Errorf("take ca lock: %w", err)
		}
		var preparedID string
		var created time.Time
		err := tx.QueryRow(ctx, "SELECT id, created_at FROM ca_roots WHERE state = 'prepared' AND NOT upstream").Scan(&preparedID, &created)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
		case err != nil:
			return fmt.Errorf("read prepared root: %w", err)
		case !now.Before(created.Add(c.set.publishDelay())):
			// Unseal before switching: a replica with the wrong KEK must
			// not make a root active that it cannot use.
			if _, err := c.loadRoot(ctx, tx, "id = $1", preparedID); err != nil {
				return fmt.Errorf("load prepared root: %w", err)
			}
			if _, err := tx.Exec(ctx, "UPDATE ca_roots SET state = 'retiring', retiring_at = $1 WHERE state = 'active' AND NOT upstream", now); err != nil {
				return fmt.Errorf("retire active root: %w", err)
			}
			if _, err := tx.Exec(ctx, "UPDATE ca_roots SET state = 'active', activated_at = $2 WHERE id = $1", preparedID, now); err != nil {
				return fmt.Errorf("activate prepared root: %w", err)
			}
			c.log.Info("root rotation: new root now signs; old root retiring", logRoot, preparedID)
			changed = true
		}
		rows, err := tx.Query(ctx, "SELECT id, retiring_at FROM ca_roots WHERE state = 'retiring' AND NOT upstream")
		if err != nil {
			return fmt.Errorf("read retiring roots: %w", err)
		}
		type retiring struct {
			id string
			at time.Time
		}
		var rs []retiring
		for rows.Next() {
			var r retiring
			if err := rows.Scan(&r.id, &r.at); err != nil {
				rows.Close()
				return fmt.Errorf("read retiring roots: %w", err)
			}
			rs = append(rs, r)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("read retiring roots: %w", err)
		}
		for _, r := range rs {
			at, err := c.retireAt(ctx, tx, r.id, r.at)
			if err != nil {
				return err
			}
			// x509 treats a certificate as valid at its NotAfter instant.
			if !now.After(at) {
				continue
			}
			if _, err := tx.Exec(ctx, "UPDATE ca_roots SET state = 'retired', retired_at = $2 WHERE id = $1", r.id, now); err != nil {
				return fmt.Errorf("retire root %s: %w", r.id, err)
			}
			c.log.Info("root rotation done: old root removed from the bundle", logRoot, r.id)
			changed = true
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("advance root rotation: %w", err)
	}
	if changed {
		return c.refreshBundle(ctx)
	}
	return nil
}
