package xds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Endpoint is a workload registered through its xDS node metadata.
type Endpoint struct {
	NodeID    string            `json:"node_id"`
	SPIFFEID  string            `json:"spiffe_id"`
	Service   string            `json:"service"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels"`
	Address   string            `json:"address"`
	Ports     []int             `json:"ports"`
	// Healthy is set once the workload has ACKed its own configuration,
	// and while its data plane reports its app healthy.
	Healthy bool `json:"healthy"`
}

// ErrNodeClaimed is returned when a node id is held by another identity.
var ErrNodeClaimed = errors.New("node id is registered to another identity")

// Register records e as live (no expiry) on behalf of replica. A node id
// already held, unexpired, by another SPIFFE ID is refused: a node id is
// bound to the identity that registered it, so nobody can take over
// another workload's configuration. The change is announced.
func (s *Store) Register(ctx context.Context, replica string, e Endpoint) error {
	labels, _ := json.Marshal(e.Labels)
	ports, _ := json.Marshal(e.Ports)
	now := s.clock.Now().UTC()
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("register: %w", err)
	}
	defer tx.Rollback(ctx)
	var holder string
	var exp *time.Time
	err = tx.QueryRow(ctx, `SELECT spiffe_id, expires_at FROM mesh_endpoints WHERE node_id=$1 FOR UPDATE`, e.NodeID).Scan(&holder, &exp)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return fmt.Errorf("register: %w", err)
	case holder != e.SPIFFEID && (exp == nil || exp.After(now)):
		return fmt.Errorf("%w: %s", ErrNodeClaimed, e.NodeID)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO mesh_endpoints (node_id, spiffe_id, service, namespace, labels, address, ports, replica, expires_at, updated_at)
		VALUES ($1,$2,$3,$4,$5,$6,$7,$8,NULL,$9)
		ON CONFLICT (node_id) DO UPDATE SET spiffe_id=$2, service=$3, namespace=$4, labels=$5, address=$6, ports=$7, replica=$8, expires_at=NULL, updated_at=$9,
			healthy = mesh_endpoints.healthy AND mesh_endpoints.spiffe_id=$2 AND mesh_endpoints.address=$6 AND mesh_endpoints.ports=$7`,
		e.NodeID, e.SPIFFEID, e.Service, e.Namespace, labels, e.Address, ports, replica, now); err != nil {
		return fmt.Errorf("register: %w", err)
	}
	if _, err := tx.Exec(ctx, `SELECT pg_notify($1, $2)`, NotifyChannel, "registry"); err != nil {
		return fmt.Errorf("register: notify: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("register: %w", err)
	}
	return nil
}

// SetHealthy records whether a registered node can serve, and announces a
// change.
func (s *Store) SetHealthy(ctx context.Context, nodeID, spiffeID string, healthy bool) error {
	tag, err := s.pool.Exec(ctx, `UPDATE mesh_endpoints SET healthy=$3 WHERE node_id=$1 AND spiffe_id=$2 AND healthy <> $3`, nodeID, spiffeID, healthy)
	if err != nil {
		return fmt.Errorf("set healthy: %w", err)
	}
	if tag.RowsAffected() > 0 {
		if _, err := s.pool.Exec(ctx, `SELECT pg_notify($1, $2)`, NotifyChannel, "registry"); err != nil {
			return fmt.Errorf("set healthy: notify: %w", err)
		}
	}
	return nil
}

// Leave starts a node's grace period: it stays registered until grace has
// passed, unless it registers again meanwhile.
func (s *Store) Leave(ctx context.Context, nodeID, spiffeID string, grace time.Duration) error {
	_, err := s.pool.Exec(ctx, `UPDATE mesh_endpoints SET expires_at=$3, updated_at=$4 WHERE node_id=$1 AND spiffe_id=$2`,
		nodeID, spiffeID, s.clock.Now().UTC().Add(grace), s.clock.Now().UTC())
	if err != nil {
		return fmt.Errorf("leave: %w", err)
	}
	return nil
}

// Stale is the default of how long a registration whose replica stopped
// refreshing it (Touch) stays live: it outlives a replica that crashed
// without calling Leave by this much (Store.SetStale changes it).
const Stale = 90 * time.Second

// SetStale sets how long an unrefreshed registration stays live (Stale
// by default). Call it before the Store is used; it must exceed the
// interval at which replicas Touch their registrations.
func (s *Store) SetStale(d time.Duration) {
	if d > 0 {
		s.stale = d
	}
}

// Touch refreshes the registrations replica holds streams for, so they do
// not go stale.
func (s *Store) Touch(ctx context.Context, replica string, nodeIDs []string) error {
	if len(nodeIDs) == 0 {
		return nil
	}
	_, err := s.pool.Exec(ctx, `UPDATE mesh_endpoints SET updated_at=$3 WHERE replica=$1 AND node_id = ANY($2) AND expires_at IS NULL`,
		replica, nodeIDs, s.clock.Now().UTC())
	if err != nil {
		return fmt.Errorf("touch registrations: %w", err)
	}
	return nil
}

// Reap deletes registrations whose grace period is over, or that went
// stale, and announces the change when there were any. It returns how many
// it removed.
func (s *Store) Reap(ctx context.Context) (int, error) {
	now := s.clock.Now().UTC()
	tag, err := s.pool.Exec(ctx, `DELETE FROM mesh_endpoints WHERE (expires_at IS NOT NULL AND expires_at <= $1) OR (expires_at IS NULL AND updated_at <= $2)`, now, now.Add(-s.stale))
	if err != nil {
		return 0, fmt.Errorf("reap: %w", err)
	}
	n := int(tag.RowsAffected())
	if n > 0 {
		if _, err := s.pool.Exec(ctx, `SELECT pg_notify($1, $2)`, NotifyChannel, "registry"); err != nil {
			return n, fmt.Errorf("reap: notify: %w", err)
		}
	}
	return n, nil
}

// Endpoints returns every registration still inside its lifetime: held by
// a stream (and refreshed within Stale) or inside its grace period.
func (s *Store) Endpoints(ctx context.Context) ([]Endpoint, error) {
	now := s.clock.Now().UTC()
	rows, err := s.pool.Query(ctx, `SELECT node_id, spiffe_id, service, namespace, labels, address, ports, healthy FROM mesh_endpoints
		WHERE (expires_at IS NULL AND updated_at > $2) OR expires_at > $1 ORDER BY node_id`, now, now.Add(-s.stale))
	if err != nil {
		return nil, fmt.Errorf("endpoints: %w", err)
	}
	defer rows.Close()
	var out []Endpoint
	for rows.Next() {
		var e Endpoint
		var labels, ports []byte
		if err := rows.Scan(&e.NodeID, &e.SPIFFEID, &e.Service, &e.Namespace, &labels, &e.Address, &ports, &e.Healthy); err != nil {
			return nil, fmt.Errorf("endpoints: %w", err)
		}
		if err := json.Unmarshal(labels, &e.Labels); err != nil {
			return nil, fmt.Errorf("endpoints: labels: %w", err)
		}
		if err := json.Unmarshal(ports, &e.Ports); err != nil {
			return nil, fmt.Errorf("endpoints: ports: %w", err)
		}
		out = append(out, e)
	}
	return out, rows.Err()
}
