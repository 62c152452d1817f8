package authority

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/authority/selector"
)

// Path prefixes that keep the kinds of identity apart: a node can never be
// registered as a workload's ID, nor a workload as a node, and nothing but
// writd itself is the control plane.
const (
	nodePathPrefix         = "/node/"
	controlPlanePathPrefix = "/writ/"
)

// Limits on what the admin API accepts.
const (
	MaxJoinTokenTTL = 24 * time.Hour
	maxSelectors    = 32
)

// ErrNotFound is returned when a token, entry or node does not exist.
var ErrNotFound = errors.New("not found")

// InputError is a request the caller got wrong; its message is safe to
// return to the caller.
type InputError struct{ Msg string }

func (e *InputError) Error() string { return e.Msg }

func inputErrorf(format string, args ...any) error {
	return &InputError{Msg: fmt.Sprintf(format, args...)}
}

// Registry is the authority's PostgreSQL-backed record of join tokens,
// attested nodes, registration entries and issuances. Safe for concurrent
// use.
type Registry struct {
	pool   *pgxpool.Pool
	td     spiffeid.TrustDomain
	clock  clockwork.Clock
	onIssu IssuanceHook
}

// IssuanceHook is called inside the transaction that writes issuance log
// rows, so that what it writes (writd's audit events) commits with them
// or not at all.
type IssuanceHook func(ctx context.Context, tx pgx.Tx, rows []Issuance) error

// OnIssuance sets the hook RecordIssuance calls. Set it before use; it is
// not synchronized.
func (r *Registry) OnIssuance(h IssuanceHook) { r.onIssu = h }

// NewRegistry returns a Registry for one trust domain.
func NewRegistry(pool *pgxpool.Pool, td spiffeid.TrustDomain, clock clockwork.Clock) *Registry {
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	return &Registry{pool: pool, td: td, clock: clock}
}

// ValidateNodeID checks that id is a node identity of this trust domain:
// spiffe://<td>/node/<name>.
func (r *Registry) ValidateNodeID(text string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(text)
	if err != nil {
		return spiffeid.ID{}, inputErrorf("invalid SPIFFE ID %q: %v", text, err)
	}
	if id.TrustDomain() != r.td {
		return spiffeid.ID{}, inputErrorf("SPIFFE ID %q is outside trust domain %q", text, r.td.Name())
	}
	if !strings.HasPrefix(id.Path(), nodePathPrefix) || len(id.Path()) == len(nodePathPrefix) {
		return spiffeid.ID{}, inputErrorf("node SPIFFE ID %q must look like spiffe://%s/node/NAME", text, r.td.Name())
	}
	return id, nil
}

// ValidateWorkloadID checks that id is a workload identity of this trust
// domain: not a node and not the control plane.
func (r *Registry) ValidateWorkloadID(text string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(text)
	if err != nil {
		return spiffeid.ID{}, inputErrorf("invalid SPIFFE ID %q: %v", text, err)
	}
	if id.TrustDomain() != r.td {
		return spiffeid.ID{}, inputErrorf("SPIFFE ID %q is outside trust domain %q", text, r.td.Name())
	}
	p := id.Path()
	if p == "" {
		return spiffeid.ID{}, inputErrorf("workload SPIFFE ID %q needs a path, e.g. spiffe://%s/ns/default/sa/web", text, r.td.Name())
	}
	if strings.HasPrefix(p, nodePathPrefix) || strings.HasPrefix(p, controlPlanePathPrefix) {
		return spiffeid.ID{}, inputErrorf("workload SPIFFE ID %q may not start with /node/ or /writ/: those paths are reserved", text)
	}
	return id, nil
}

// JoinToken is a freshly created one-time token; Token is shown once and
// never stored.
type JoinToken struct {
	Token     string
	SPIFFEID  spiffeid.ID
	ExpiresAt time.Time
}

// CreateJoinToken makes a one-time token that attests one node as id.
func (r *Registry) CreateJoinToken(ctx context.Context, idText string, ttl time.Duration, createdBy string) (*JoinToken, error) {
	id, err := r.ValidateNodeID(idText)
	if err != nil {
		return nil, err
	}
	if ttl <= 0 || ttl > MaxJoinTokenTTL {
		return nil, inputErrorf("token ttl %s must be positive and at most %s", ttl, MaxJoinTokenTTL)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("create join token: %w", err)
	}
	tok := base64.RawURLEncoding.EncodeToString(raw)
	exp := r.clock.Now().Add(ttl).UTC().Truncate(time.Microsecond)
	_, err = r.pool.Exec(ctx, `INSERT INTO join_tokens (token_hash, spiffe_id, expires_at, created_by) VALUES ($1, $2, $3, $4)`,
		hashToken(tok), id.String(), exp, createdBy)
	if err != nil {
		return nil, fmt.Errorf("create join token: %w", err)
	}
	return &JoinToken{Token: tok, SPIFFEID: id, ExpiresAt: exp}, nil
}

func hashToken(tok string) []byte {
	h := sha256.Sum256([]byte(tok))
	return h[:]
}

// ConsumeJoinToken marks a token used and returns the node ID it attests.
// A token works once: a concurrent second use finds it used. The error
// says which of unknown, used or expired it was.
func (r *Registry) ConsumeJoinToken(ctx context.Context, tok, usedBy string) (spiffeid.ID, error) {
	if tok == "" || len(tok) > 256 {
		return spiffeid.ID{}, inputErrorf("join token is malformed")
	}
	h := hashToken(tok)
	now := r.clock.Now().UTC()
	var idText string
	err := r.pool.QueryRow(ctx, `UPDATE join_tokens SET used_at = $2, used_by = $3
		WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2 RETURNING spiffe_id`, h, now, usedBy).Scan(&idText)
	if errors.Is(err, pgx.ErrNoRows) {
		var usedAt *time.Time
		var exp time.Time
		err := r.pool.QueryRow(ctx, `SELECT used_at, expires_at FROM join_tokens WHERE token_hash = $1`, h).Scan(&usedAt, &exp)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			return spiffeid.ID{}, inputErrorf("join token is unknown")
		case err != nil:
			return spiffeid.ID{}, fmt.Errorf("consume join token: %w", err)
		case usedAt != nil:
			return spiffeid.ID{}, inputErrorf("join token was already used")
		default:
			return spiffeid.ID{}, inputErrorf("join token expired at %s", exp.UTC().Format(time.RFC3339))
		}
	}
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("consume join token: %w", err)
	}
	return spiffeid.FromString(idText)
}

// Node is an attested node agent.
type Node struct {
	ID           spiffeid.ID
	Attestation  string
	AttestedAt   time.Time
	SVIDSerial   string
	SVIDNotAfter time.Time
	Banned       bool
}

// UpsertNode records a node's (re)attestation or a new node SVID.
func (r *Registry) UpsertNode(ctx context.Context, id spiffeid.ID, attestation, serial string, notAfter time.Time) error {
	now := r.clock.Now().UTC()
	_, err := r.pool.Exec(ctx, `INSERT INTO nodes (spiffe_id, attestation, attested_at, svid_serial, svid_not_after, last_seen)
		VALUES ($1, $2, $3, $4, $5, $3)
		ON CONFLICT (spiffe_id) DO UPDATE SET svid_serial = $4, svid_not_after = $5, last_seen = $3,
			attestation = CASE WHEN $2 = '' THEN nodes.attestation ELSE $2 END,
			attested_at = CASE WHEN $2 = '' THEN nodes.attested_at ELSE $3 END`,
		id.String(), attestation, now, serial, notAfter)
	if err != nil {
		return fmt.Errorf("record node: %w", err)
	}
	return nil
}

// GetNode returns an attested node or ErrNotFound.
func (r *Registry) GetNode(ctx context.Context, id spiffeid.ID) (*Node, error) {
	n := &Node{ID: id}
	var serial *string
	var notAfter *time.Time
	err := r.pool.QueryRow(ctx, `SELECT attestation, attested_at, svid_serial, svid_not_after, banned FROM nodes WHERE spiffe_id = $1`,
		id.String()).Scan(&n.Attestation, &n.AttestedAt, &serial, &notAfter, &n.Banned)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("get node: %w", err)
	}
	if serial != nil {
		n.SVIDSerial = *serial
	}
	if notAfter != nil {
		n.SVIDNotAfter = *notAfter
	}
	return n, nil
}

// Entry is a registration entry: workloads on node ParentID whose
// selectors include all of Selectors get SPIFFEID.
type Entry struct {
	ID        string
	SPIFFEID  spiffeid.ID
	ParentID  spiffeid.ID
	Selectors []selector.Selector
	X509TTL   time.Duration // 0: the CA's default
	JWTTTL    time.Duration // 0: the CA's default
	CreatedAt time.Time
	CreatedBy string
}

// EntryInput is what the admin API accepts to create an entry.
type EntryInput struct {
	SPIFFEID  string
	ParentID  string
	Selectors []string
	X509TTL   time.Duration
	JWTTTL    time.Duration
}

// CreateEntry validates and stores a registration entry.
func (r *Registry) CreateEntry(ctx context.Context, in EntryInput, createdBy string) (*Entry, error) {
	id, err := r.ValidateWorkloadID(in.SPIFFEID)
	if err != nil {
		return nil, err
	}
	parent, err := r.ValidateNodeID(in.ParentID)
	if err != nil {
		return nil, inputErrorf("parent: %v", err)
	}
	if len(in.Selectors) > maxSelectors {
		return nil, inputErrorf("at most %d selectors per entry", maxSelectors)
	}
	sels, err := selector.ParseAll(in.Selectors)
	if err != nil {
		return nil, &InputError{Msg: err.Error()}
	}
	for _, ttl := range []time.Duration{in.X509TTL, in.JWTTTL} {
		if ttl < 0 || ttl%time.Second != 0 || ttl > 365*24*time.Hour {
			return nil, inputErrorf("ttl %s must be whole seconds, not negative, at most a year (the CA caps it further)", ttl)
		}
	}
	e := &Entry{SPIFFEID: id, ParentID: parent, Selectors: sels, X509TTL: in.X509TTL, JWTTTL: in.JWTTTL, CreatedBy: createdBy}
	err = r.pool.QueryRow(ctx, `INSERT INTO registration_entries (spiffe_id, parent_id, selectors, x509_ttl_seconds, jwt_ttl_seconds, created_by)
		VALUES ($1, $2, $3, $4, $5, $6) RETURNING id::text, created_at`,
		id.String(), parent.String(), selector.Strings(sels), nullSeconds(in.X509TTL), nullSeconds(in.JWTTTL), createdBy).Scan(&e.ID, &e.CreatedAt)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" {
		return nil, inputErrorf("an entry for %s on %s with these selectors already exists", id, parent)
	}
	if err != nil {
		return nil, fmt.Errorf("create entry: %w", err)
	}
	return e, nil
}

func nullSeconds(d time.Duration) *int32 {
	if d == 0 {
		return nil
	}
	s := int32(d / time.Second)
	return &s
}

const entryColumns = `id::text, spiffe_id, parent_id, selectors, x509_ttl_seconds, jwt_ttl_seconds, created_at, created_by`

func scanEntry(row pgx.Row) (*Entry, error) {
	var e Entry
	var id, parent string
	var sels []string
	var x509TTL, jwtTTL *int32
	if err := row.Scan(&e.ID, &id, &parent, &sels, &x509TTL, &jwtTTL, &e.CreatedAt, &e.CreatedBy); err != nil {
		return nil, err
	}
	var err error
	if e.SPIFFEID, err = spiffeid.FromString(id); err != nil {
		return nil, fmt.Errorf("entry %s: stored spiffe id: %w", e.ID, err)
	}
	if e.ParentID, err = spiffeid.FromString(parent); err != nil {
		return nil, fmt.Errorf("entry %s: stored parent id: %w", e.ID, err)
	}
	if e.Selectors, err = selector.ParseAll(sels); err != nil {
		return nil, fmt.Errorf("entry %s: stored selectors: %w", e.ID, err)
	}
	if x509TTL != nil {
		e.X509TTL = time.Duration(*x509TTL) * time.Second
	}
	if jwtTTL != nil {
		e.JWTTTL = time.Duration(*jwtTTL) * time.Second
	}
	return &e, nil
}

// ListEntries returns entries, all of them or those of one parent, oldest
// first.
func (r *Registry) ListEntries(ctx context.Context, parent *spiffeid.ID) ([]*Entry, error) {
	q := `SELECT ` + entryColumns + ` FROM registration_entries`
	args := []any{}
	if parent != nil {
		q += ` WHERE parent_id = $1`
		args = append(args, parent.String())
	}
	q += ` ORDER BY created_at, id`
	rows, err := r.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list entries: %w", err)
	}
	defer rows.Close()
	var out []*Entry
	for rows.Next() {
		e, err := scanEntry(rows)
		if err != nil {
			return nil, fmt.Errorf("list entries: %w", err)
		}
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list entries: %w", err)
	}
	return out, nil
}

// GetEntry returns one entry or ErrNotFound.
func (r *Registry) GetEntry(ctx context.Context, id string) (*Entry, error) {
	if !isUUID(id) {
		return nil, ErrNotFound
	}
	e, err := scanEntry(r.pool.QueryRow(ctx, `SELECT `+entryColumns+` FROM registration_entries WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("get entry: %w", err)
	}
	return e, nil
}

// DeleteEntry removes an entry; agents stop serving its SVID at their next
// sync.
func (r *Registry) DeleteEntry(ctx context.Context, id string) error {
	if !isUUID(id) {
		return ErrNotFound
	}
	tag, err := r.pool.Exec(ctx, `DELETE FROM registration_entries WHERE id = $1`, id)
	if err != nil {
		return fmt.Errorf("delete entry: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return nil
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
				return false
			}
		}
	}
	return true
}

// Issuance is one row of the issuance log.
type Issuance struct {
	At       time.Time
	Kind     string // x509-svid, jwt-svid, node-svid, intermediate, join-token
	Outcome  string // issued, renewed, used, refused
	Serial   string
	SPIFFEID string
	NotAfter time.Time
	NodeID   string
	EntryID  string
	Caller   string
	Signer   string
	Reason   string
}

// Issuance kinds and outcomes.
const (
	KindX509SVID  = "x509-svid"
	KindJWTSVID   = "jwt-svid"
	KindNodeSVID  = "node-svid"
	KindJoinToken = "join-token"
	// KindIntermediate is an intermediate CA certificate of a replica.
	KindIntermediate = "intermediate"

	OutcomeIssued  = "issued"
	OutcomeRenewed = "renewed"
	OutcomeUsed    = "used"
	OutcomeRefused = "refused"
)

// RecordIssuance appends rows to the issuance log, several in one round
// trip and one transaction: either all are on record or none.
func (r *Registry) RecordIssuance(ctx context.Context, rows ...Issuance) error {
	const q = `INSERT INTO issuance_log (at, kind, outcome, serial, spiffe_id, not_after, node_id, entry_id, caller, signer, reason)
		VALUES ($1, $2, $3, NULLIF($4, ''), NULLIF($5, ''), $6, NULLIF($7, ''), NULLIF($8, '')::uuid, NULLIF($9, ''), NULLIF($10, ''), NULLIF($11, ''))`
	now := r.clock.Now()
	b := &pgx.Batch{}
	for i := range rows {
		if rows[i].At.IsZero() {
			rows[i].At = now
		}
		is := rows[i]
		b.Queue(q, is.At.UTC(), is.Kind, is.Outcome, is.Serial, is.SPIFFEID, nullTime(is.NotAfter), is.NodeID, is.EntryID, is.Caller, is.Signer, is.Reason)
	}
	var err error
	switch {
	case r.onIssu != nil:
		err = pgx.BeginFunc(ctx, r.pool, func(tx pgx.Tx) error {
			if err := tx.SendBatch(ctx, b).Close(); err != nil {
				return err
			}
			return r.onIssu(ctx, tx, rows)
		})
	case len(rows) == 1:
		err = r.pool.SendBatch(ctx, b).Close()
	default:
		err = pgx.BeginFunc(ctx, r.pool, func(tx pgx.Tx) error { return tx.SendBatch(ctx, b).Close() })
	}
	if err != nil {
		return fmt.Errorf("record issuance: %w", err)
	}
	return nil
}

// ListIssuances returns the newest issuance log rows first.
func (r *Registry) ListIssuances(ctx context.Context, limit int) ([]Issuance, error) {
	if limit <= 0 || limit > 10000 {
		limit = 100
	}
	rows, err := r.pool.Query(ctx, `SELECT at, kind, outcome, coalesce(serial, ''), coalesce(spiffe_id, ''), coalesce(not_after, 'epoch'::timestamptz),
		coalesce(node_id, ''), coalesce(entry_id::text, ''), coalesce(caller, ''), coalesce(signer, ''), coalesce(reason, '')
		FROM issuance_log ORDER BY id DESC LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("list issuances: %w", err)
	}
	defer rows.Close()
	var out []Issuance
	for rows.Next() {
		var is Issuance
		if err := rows.Scan(&is.At, &is.Kind, &is.Outcome, &is.Serial, &is.SPIFFEID, &is.NotAfter, &is.NodeID, &is.EntryID, &is.Caller, &is.Signer, &is.Reason); err != nil {
			return nil, fmt.Errorf("list issuances: %w", err)
		}
		if is.NotAfter.Unix() == 0 {
			is.NotAfter = time.Time{}
		}
		out = append(out, is)
	}
	return out, rows.Err()
}

func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}
