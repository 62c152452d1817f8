package xds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"

	"github.com/writmesh/writ/config"
)

// NotifyChannel is the PostgreSQL channel every mesh change (configuration
// or registry) is announced on, so that every writd replica rebuilds.
const NotifyChannel = "writ_mesh"

// ErrNotFound is returned for a resource or revision that does not exist.
var ErrNotFound = errors.New("not found")

// Store keeps the mesh configuration and its history in PostgreSQL. Safe
// for concurrent use; writers are serialized by the generation row.
type Store struct {
	pool     *pgxpool.Pool
	clock    clockwork.Clock
	stale    time.Duration
	onChange ChangeHook
}

// ChangeHook is called inside the transaction of an apply, delete or
// rollback, once per resource it changes (action is "apply", "delete" or
// "rollback"), so that what it writes (writd's audit events) commits with
// the change or not at all. An error aborts the change.
type ChangeHook func(ctx context.Context, tx pgx.Tx, author, action string, ch Change) error

// OnChange sets the hook. Set it before use; it is not synchronized.
func (s *Store) OnChange(h ChangeHook) { s.onChange = h }

// NewStore returns a Store on pool; clock stamps changes (nil: real time).
func NewStore(pool *pgxpool.Pool, clock clockwork.Clock) *Store {
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	return &Store{pool: pool, clock: clock, stale: Stale}
}

// Change is what one apply, delete or rollback did (or, in a dry run,
// would do) to one resource.
type Change struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Op is created, updated, unchanged or deleted.
	Op       string `json:"op"`
	Revision int64  `json:"revision,omitempty"`
	Diff     string `json:"diff,omitempty"`
}

// Revision is one entry of a resource's history.
type Revision struct {
	Revision   int64            `json:"revision"`
	Generation int64            `json:"generation"`
	Op         string           `json:"op"`
	Author     string           `json:"author"`
	At         time.Time        `json:"at"`
	Diff       string           `json:"diff"`
	Resource   *config.Resource `json:"resource,omitempty"`
}

type stored struct {
	res *config.Resource
	rev int64
}

// lockAndLoad takes the writer lock (the generation row) and reads every
// live resource.
func lockAndLoad(ctx context.Context, tx pgx.Tx) (int64, map[string]*stored, error) {
	var gen int64
	if err := tx.QueryRow(ctx, `SELECT generation FROM mesh_generation FOR UPDATE`).Scan(&gen); err != nil {
		return 0, nil, fmt.Errorf("lock mesh: %w", err)
	}
	rows, err := tx.Query(ctx, `SELECT resource, revision FROM mesh_resources`)
	if err != nil {
		return 0, nil, fmt.Errorf("load mesh: %w", err)
	}
	cur, err := scanResources(rows)
	return gen, cur, err
}

func scanResources(rows pgx.Rows) (map[string]*stored, error) {
	defer rows.Close()
	cur := map[string]*stored{}
	for rows.Next() {
		var raw []byte
		var rev int64
		if err := rows.Scan(&raw, &rev); err != nil {
			return nil, fmt.Errorf("load mesh: %w", err)
		}
		r := new(config.Resource)
		if err := json.Unmarshal(raw, r); err != nil {
			return nil, fmt.Errorf("load mesh: stored resource: %w", err)
		}
		cur[r.Key()] = &stored{res: r, rev: rev}
	}
	return cur, rows.Err()
}

// Apply creates or replaces rs, all or none: the merged configuration must
// pass config.CheckMesh. With dryRun it only reports what would change.
// The change is announced on NotifyChannel.
func (s *Store) Apply(ctx context.Context, author string, rs []*config.Resource, dryRun bool) ([]Change, error) {
	return s.change(ctx, author, dryRun, func(cur map[string]*stored) ([]edit, error) {
		var eds []edit
		for _, r := range rs {
			eds = append(eds, edit{key: r.Key(), res: r, op: "apply"})
		}
		return eds, nil
	})
}

// Delete removes one resource; refused if what remains fails CheckMesh
// (for example a route still sends traffic to the deleted service).
func (s *Store) Delete(ctx context.Context, author, kind, namespace, name string) (Change, error) {
	key := kind + "/" + namespace + "/" + name
	chs, err := s.change(ctx, author, false, func(cur map[string]*stored) ([]edit, error) {
		if cur[key] == nil {
			return nil, ErrNotFound
		}
		return []edit{{key: key, op: "delete"}}, nil
	})
	if err != nil {
		return Change{}, err
	}
	return chs[0], nil
}

// Rollback makes revision rev of a resource current again, as a new
// revision; a deleted resource can be brought back this way.
func (s *Store) Rollback(ctx context.Context, author, kind, namespace, name string, rev int64) (Change, error) {
	key := kind + "/" + namespace + "/" + name
	chs, err := s.change(ctx, author, false, func(cur map[string]*stored) ([]edit, error) {
		var raw []byte
		err := s.pool.QueryRow(ctx, `SELECT resource FROM mesh_revisions WHERE kind=$1 AND namespace=$2 AND name=$3 AND revision=$4`, kind, namespace, name, rev).Scan(&raw)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, ErrNotFound
		}
		if err != nil {
			return nil, fmt.Errorf("read revision: %w", err)
		}
		if raw == nil {
			return nil, &config.FieldError{File: key, Msg: fmt.Sprintf("revision %d is a deletion; roll back to a revision with content", rev)}
		}
		r := new(config.Resource)
		if err := json.Unmarshal(raw, r); err != nil {
			return nil, fmt.Errorf("stored revision: %w", err)
		}
		return []edit{{key: key, res: r, op: "rollback"}}, nil
	})
	if err != nil {
		return Change{}, err
	}
	return chs[0], nil
}

type edit struct {
	key string
	res *config.Resource // nil: delete
	op  string
}

func (s *Store) change(ctx context.Context, author string, dryRun bool, plan func(map[string]*stored) ([]edit, error)) ([]Change, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(ctx)
	gen, cur, err := lockAndLoad(ctx, tx)
	if err != nil {
		return nil, err
	}
	eds, err := plan(cur)
	if err != nil {
		return nil, err
	}
	next := map[string]*config.Resource{}
	for k, st := range cur {
		next[k] = st.res
	}
	var incoming []*config.Resource
	for _, e := range eds {
		if e.res == nil {
			delete(next, e.key)
		} else {
			incoming = append(incoming, e.res)
			delete(next, e.key)
		}
	}
	// Incoming resources go first so duplicates among them are reported
	// against their files, and stored ones after.
	all := slices.Clone(incoming)
	for _, k := range sortedKeys(next) {
		all = append(all, next[k])
	}
	if err := config.CheckMesh(all); err != nil {
		return nil, err
	}
	now := s.clock.Now().UTC()
	gen++
	var changes []Change
	changed := false
	for _, e := range eds {
		kind, ns, name := splitKey(e.key)
		ch := Change{Kind: kind, Namespace: ns, Name: name}
		old := cur[e.key]
		var before, after []byte
		if old != nil {
			before, _ = config.MarshalYAMLDoc([]*config.Resource{old.res})
			ch.Revision = old.rev
		}
		var content []byte
		if e.res != nil {
			after, _ = config.MarshalYAMLDoc([]*config.Resource{e.res})
			if content, err = json.Marshal(e.res); err != nil {
				return nil, fmt.Errorf("encode %s: %w", e.key, err)
			}
		}
		switch {
		case e.res == nil:
			ch.Op = "deleted"
		case old == nil:
			ch.Op = "created"
		case string(before) == string(after):
			ch.Op = "unchanged"
		default:
			ch.Op = "updated"
		}
		ch.Diff = LineDiff(string(before), string(after))
		if ch.Op != "unchanged" {
			ch.Revision = s.nextRev(ctx, tx, kind, ns, name, err)
			if ch.Revision == 0 {
				return nil, fmt.Errorf("next revision of %s", e.key)
			}
			changed = true
		}
		changes = append(changes, ch)
		if dryRun || ch.Op == "unchanged" {
			continue
		}
		if e.res == nil {
			if _, err := tx.Exec(ctx, `DELETE FROM mesh_resources WHERE kind=$1 AND namespace=$2 AND name=$3`, kind, ns, name); err != nil {
				return nil, fmt.Errorf("delete %s: %w", e.key, err)
			}
		} else if _, err := tx.Exec(ctx, `INSERT INTO mesh_resources (kind, namespace, name, revision, generation, resource, author, updated_at)
			VALUES ($1,$2,$3,$4,$5,$6,$7,$8)
			ON CONFLICT (kind, namespace, name) DO UPDATE SET revision=$4, generation=$5, resource=$6, author=$7, updated_at=$8`,
			kind, ns, name, ch.Revision, gen, content, author, now); err != nil {
			return nil, fmt.Errorf("store %s: %w", e.key, err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO mesh_revisions (kind, namespace, name, revision, generation, op, resource, diff, author, at)
			VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)`, kind, ns, name, ch.Revision, gen, e.op, content, ch.Diff, author, now); err != nil {
			return nil, fmt.Errorf("record revision of %s: %w", e.key, err)
		}
		if s.onChange != nil {
			if err := s.onChange(ctx, tx, author, e.op, ch); err != nil {
				return nil, fmt.Errorf("audit change of %s: %w", e.key, err)
			}
		}
	}
	if dryRun || !changed {
		return changes, nil
	}
	if _, err := tx.Exec(ctx, `UPDATE mesh_generation SET generation=$1`, gen); err != nil {
		return nil, fmt.Errorf("bump generation: %w", err)
	}
	if _, err := tx.Exec(ctx, `SELECT pg_notify($1, $2)`, NotifyChannel, fmt.Sprintf("config %d", gen)); err != nil {
		return nil, fmt.Errorf("notify: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	return changes, nil
}

func (s *Store) nextRev(ctx context.Context, tx pgx.Tx, kind, ns, name string, _ error) int64 {
	var rev int64
	if err := tx.QueryRow(ctx, `SELECT coalesce(max(revision), 0) + 1 FROM mesh_revisions WHERE kind=$1 AND namespace=$2 AND name=$3`, kind, ns, name).Scan(&rev); err != nil {
		return 0
	}
	return rev
}

// Get returns one live resource and its revision.
func (s *Store) Get(ctx context.Context, kind, namespace, name string) (*config.Resource, int64, error) {
	var raw []byte
	var rev int64
	err := s.pool.QueryRow(ctx, `SELECT resource, revision FROM mesh_resources WHERE kind=$1 AND namespace=$2 AND name=$3`, kind, namespace, name).Scan(&raw, &rev)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, 0, ErrNotFound
	}
	if err != nil {
		return nil, 0, fmt.Errorf("get %s/%s/%s: %w", kind, namespace, name, err)
	}
	r := new(config.Resource)
	if err := json.Unmarshal(raw, r); err != nil {
		return nil, 0, fmt.Errorf("stored resource: %w", err)
	}
	return r, rev, nil
}

// List returns the live resources of a kind ("" for all kinds), sorted by
// kind, namespace and name.
func (s *Store) List(ctx context.Context, kind string) ([]*config.Resource, error) {
	_, rs, err := s.Load(ctx)
	if err != nil {
		return nil, err
	}
	if kind == "" {
		return rs, nil
	}
	var out []*config.Resource
	for _, r := range rs {
		if r.Kind == kind {
			out = append(out, r)
		}
	}
	return out, nil
}

// Load returns the mesh generation and every live resource, sorted by
// kind (in config.Kinds order), namespace and name, read consistently.
func (s *Store) Load(ctx context.Context) (int64, []*config.Resource, error) {
	tx, err := s.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return 0, nil, fmt.Errorf("load mesh: %w", err)
	}
	defer tx.Rollback(ctx)
	var gen int64
	if err := tx.QueryRow(ctx, `SELECT generation FROM mesh_generation`).Scan(&gen); err != nil {
		return 0, nil, fmt.Errorf("load mesh: %w", err)
	}
	rows, err := tx.Query(ctx, `SELECT resource, revision FROM mesh_resources`)
	if err != nil {
		return 0, nil, fmt.Errorf("load mesh: %w", err)
	}
	cur, err := scanResources(rows)
	if err != nil {
		return 0, nil, err
	}
	out := make([]*config.Resource, 0, len(cur))
	for _, k := range sortedKeys(cur) {
		out = append(out, cur[k].res)
	}
	return gen, out, nil
}

// History returns a resource's revisions, oldest first.
func (s *Store) History(ctx context.Context, kind, namespace, name string) ([]Revision, error) {
	rows, err := s.pool.Query(ctx, `SELECT revision, generation, op, author, at, diff, resource FROM mesh_revisions
		WHERE kind=$1 AND namespace=$2 AND name=$3 ORDER BY revision`, kind, namespace, name)
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	defer rows.Close()
	var out []Revision
	for rows.Next() {
		var rv Revision
		var raw []byte
		if err := rows.Scan(&rv.Revision, &rv.Generation, &rv.Op, &rv.Author, &rv.At, &rv.Diff, &raw); err != nil {
			return nil, fmt.Errorf("history: %w", err)
		}
		if raw != nil {
			rv.Resource = new(config.Resource)
			if err := json.Unmarshal(raw, rv.Resource); err != nil {
				return nil, fmt.Errorf("history: %w", err)
			}
		}
		out = append(out, rv)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	if len(out) == 0 {
		return nil, ErrNotFound
	}
	return out, nil
}

func splitKey(k string) (kind, ns, name string) {
	p := strings.SplitN(k, "/", 3)
	return p[0], p[1], p[2]
}

// sortedKeys orders resource keys by kind (config.Kinds order), then
// namespace and name.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	rank := func(k string) int { kind, _, _ := splitKey(k); return slices.Index(config.Kinds, kind) }
	slices.SortFunc(keys, func(a, b string) int {
		if ra, rb := rank(a), rank(b); ra != rb {
			return ra - rb
		}
		return strings.Compare(a, b)
	})
	return keys
}

// LineDiff is a minimal line diff of a and b: unchanged lines start with
// two spaces, removed ones with "- ", added ones with "+ ". It is O(n·m)
// and meant for single resources.
func LineDiff(a, b string) string {
	if a == b {
		return ""
	}
	x, y := splitLines(a), splitLines(b)
	n, m := len(x), len(y)
	lcs := make([][]int, n+1)
	for i := range lcs {
		lcs[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var sb strings.Builder
	i, j := 0, 0
	for i < n || j < m {
		switch {
		case i < n && j < m && x[i] == y[j]:
			sb.WriteString("  " + x[i] + "\n")
			i, j = i+1, j+1
		case i < n && (j == m || lcs[i+1][j] >= lcs[i][j+1]):
			sb.WriteString("- " + x[i] + "\n")
			i++
		default:
			sb.WriteString("+ " + y[j] + "\n")
			j++
		}
	}
	return sb.String()
}

func splitLines(s string) []string {
	s = strings.TrimSuffix(s, "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}
