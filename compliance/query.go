package compliance

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/writmesh/writ/audit/collector"
)

// querier reads the report's figures. It is the small layer between the
// report and where each fact is stored today: request decisions in
// audit_events; changes in mesh_revisions and in audit_events
// (config_change, policy_change); certificates in issuance_log and in
// audit_events (cert_*); admin calls in admin_events and logins in
// audit_events. Where a fact can be in both places, the rows are merged
// and a change or certificate recorded in both is counted once
// (docs/compliance.md gives the keys).
type querier struct {
	pool *pgxpool.Pool // for Verify
	db   db            // for everything else: one connection with JIT off
	o    *Options
}

// db is what the querier needs of a connection.
type db interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// sqlArgs numbers query parameters.
type sqlArgs struct{ args []any }

func (a *sqlArgs) p(v any) string {
	a.args = append(a.args, v)
	return fmt.Sprintf("$%d", len(a.args))
}

// idInScope is a condition on a column holding a SPIFFE ID
// (spiffe://TD/ns/NS/sa/SA): it matches the options' service and
// namespace. "" when the scope is everything.
func (q *querier) idInScope(a *sqlArgs, col string) string {
	var conds []string
	if s := q.o.Service; s != "" {
		p := a.p(s)
		conds = append(conds, fmt.Sprintf("(%[1]s = %[2]s::text OR substring(%[1]s from '^spiffe://[^/]+/ns/[^/]+/sa/([^/]+)$') = %[2]s::text)", col, p))
	}
	if n := q.o.Namespace; n != "" {
		conds = append(conds, fmt.Sprintf("substring(%s from '^spiffe://[^/]+/ns/([^/]+)/') = %s::text", col, a.p(n)))
	}
	if len(conds) == 0 {
		return ""
	}
	return "(" + strings.Join(conds, " AND ") + ")"
}

// requests is the FROM/WHERE of request decisions in range and scope.
func (q *querier) requests(a *sqlArgs) string {
	w := fmt.Sprintf("FROM audit_events e WHERE e.kind = 'request' AND e.time >= %s AND e.time < %s", a.p(q.o.From), a.p(q.o.To))
	if src := q.idInScope(a, "e.principal"); src != "" {
		w += " AND (" + src + " OR " + q.idInScope(a, "e.destination") + ")"
	}
	return w
}

// mtlsExpr decides whether a request came over mTLS: the recorder's
// attribute mtls when it set one, else whether the caller had a SPIFFE
// identity (enforcers set the principal only from a verified client
// certificate).
const mtlsExpr = `(CASE WHEN e.attributes ? 'mtls' THEN e.attributes->'mtls' = 'true'::jsonb ELSE e.principal LIKE 'spiffe://%' END)`

// rfc3339Re guards casts of recorded timestamps, so one malformed
// attribute cannot fail the whole report.
const rfc3339Re = `'^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$'`

func (q *querier) decisions(ctx context.Context, s *Sections) error {
	d := &s.Decisions
	a := &sqlArgs{}
	from := q.requests(a)
	if err := q.db.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE result = 'allow'), count(*) FILTER (WHERE result = 'deny') `+from, a.args...).
		Scan(&d.Total, &d.Allow, &d.Deny); err != nil {
		return err
	}
	a = &sqlArgs{}
	api := fmt.Sprintf("SELECT count(*) FROM audit_events e WHERE e.kind = 'decision_api' AND e.time >= %s AND e.time < %s", a.p(q.o.From), a.p(q.o.To))
	if c := q.idInScope(a, "e.principal"); c != "" {
		api += " AND (" + c + " OR " + q.idInScope(a, "e.destination") + ")"
	}
	if err := q.db.QueryRow(ctx, api, a.args...).Scan(&d.DecisionAPI); err != nil {
		return err
	}
	a = &sqlArgs{}
	from = q.requests(a)
	rows, err := q.db.Query(ctx, `SELECT principal, destination, count(*) FILTER (WHERE result = 'allow'), count(*) FILTER (WHERE result = 'deny') `+
		from+fmt.Sprintf(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT %d", MaxPairs+1), a.args...)
	if err != nil {
		return err
	}
	d.Pairs, err = pgx.CollectRows(rows, pgx.RowToStructByPos[Pair])
	if err != nil {
		return err
	}
	if len(d.Pairs) > MaxPairs {
		d.Pairs, d.PairsTruncated = d.Pairs[:MaxPairs], true
	}
	a = &sqlArgs{}
	from = q.requests(a)
	rows, err = q.db.Query(ctx, `SELECT to_char(date_trunc('day', time AT TIME ZONE 'UTC'), 'YYYY-MM-DD'), count(*) FILTER (WHERE result = 'allow'), count(*) FILTER (WHERE result = 'deny') `+
		from+" GROUP BY 1 ORDER BY 1", a.args...)
	if err != nil {
		return err
	}
	d.ByDay, err = pgx.CollectRows(rows, pgx.RowToStructByPos[Day])
	return err
}

func (q *querier) denied(ctx context.Context, s *Sections) error {
	d := &s.Denied
	d.Total = s.Decisions.Deny
	a := &sqlArgs{}
	sql := `SELECT time, id::text, principal, destination, action, resource, status, reason, cause, policy_revision ` + q.requests(a) + ` AND e.result = 'deny'`
	if q.o.DeniedAfter != "" {
		ts, id, ok := strings.Cut(q.o.DeniedAfter, "_")
		t, err := time.Parse(time.RFC3339Nano, ts)
		u, err2 := uuid.Parse(id)
		if !ok || err != nil || err2 != nil {
			return fmt.Errorf("%w: bad denied-after cursor", ErrBadOptions)
		}
		sql += fmt.Sprintf(" AND (e.time, e.id) > (%s, %s)", a.p(t), a.p(u))
	}
	sql += fmt.Sprintf(" ORDER BY e.time, e.id LIMIT %d", q.o.DeniedLimit+1)
	rows, err := q.db.Query(ctx, sql, a.args...)
	if err != nil {
		return err
	}
	d.Requests, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (DeniedRequest, error) {
		var x DeniedRequest
		var st int32
		err := r.Scan(&x.Time, &x.ID, &x.Source, &x.Destination, &x.Action, &x.Resource, &st, &x.Reason, &x.Cause, &x.PolicyRevision)
		x.Time, x.Status = x.Time.UTC(), int(st)
		return x, err
	})
	if err != nil {
		return err
	}
	if len(d.Requests) > q.o.DeniedLimit {
		d.Requests, d.Truncated = d.Requests[:q.o.DeniedLimit], true
		last := d.Requests[len(d.Requests)-1]
		d.Next = last.Time.Format(time.RFC3339Nano) + "_" + last.ID
	}
	if d.Requests == nil {
		d.Requests = []DeniedRequest{}
	}
	d.Returned = len(d.Requests)
	return nil
}

// changesSQL selects every change in range and scope from both places,
// as (time, origin, kind, namespace, name, revision, op, author, diff).
func (q *querier) changesSQL(a *sqlArgs) string {
	from, to := a.p(q.o.From), a.p(q.o.To)
	mesh := fmt.Sprintf(`SELECT at AS time, 'mesh_revisions' AS origin, kind, namespace, name, revision, op, author, diff
		FROM mesh_revisions WHERE at >= %s AND at < %s`, from, to)
	ev := fmt.Sprintf(`SELECT e.time, 'audit_events', coalesce(e.attributes->>'kind', e.kind), coalesce(e.attributes->>'namespace', ''),
			coalesce(e.attributes->>'name', e.destination),
			CASE WHEN e.attributes->>'revision' ~ '^[0-9]{1,18}$' THEN (e.attributes->>'revision')::bigint ELSE 0 END,
			e.action, e.principal, coalesce(e.attributes->>'diff', '')
		FROM audit_events e WHERE e.kind IN ('config_change', 'policy_change') AND e.time >= %s AND e.time < %s
		AND NOT EXISTS (SELECT 1 FROM mesh_revisions m WHERE m.kind = e.attributes->>'kind' AND m.namespace = e.attributes->>'namespace'
			AND m.name = e.attributes->>'name' AND m.revision::text = e.attributes->>'revision')`, from, to)
	if n := q.o.Namespace; n != "" {
		p := a.p(n)
		mesh += " AND namespace = " + p + "::text"
		ev += fmt.Sprintf(" AND (e.attributes->>'namespace' = %[1]s::text OR substring(e.destination from '^spiffe://[^/]+/ns/([^/]+)/') = %[1]s::text)", p)
	}
	if s := q.o.Service; s != "" {
		p := a.p(s)
		// A change is in a service's scope when it names the service or
		// its content mentions it (a Route's spec.service, a policy's
		// principals).
		mesh += fmt.Sprintf(" AND (name = %[1]s::text OR strpos(coalesce(resource::text, '') || diff, %[1]s::text) > 0)", p)
		ev += fmt.Sprintf(" AND strpos(e.destination || ' ' || e.resource || ' ' || e.attributes::text, %s::text) > 0", p)
	}
	return mesh + " UNION ALL " + ev
}

func (q *querier) changes(ctx context.Context, s *Sections) error {
	c := &s.Changes
	a := &sqlArgs{}
	all := q.changesSQL(a)
	if err := q.db.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE author = '') FROM (`+all+`) c`, a.args...).Scan(&c.Total, &c.Unattributed); err != nil {
		return err
	}
	a = &sqlArgs{}
	rows, err := q.db.Query(ctx, `SELECT author, count(*) FROM (`+q.changesSQL(a)+`) c GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1000`, a.args...)
	if err != nil {
		return err
	}
	if c.ByAuthor, err = pgx.CollectRows(rows, pgx.RowToStructByPos[Count]); err != nil {
		return err
	}
	a = &sqlArgs{}
	rows, err = q.db.Query(ctx, `SELECT * FROM (`+q.changesSQL(a)+fmt.Sprintf(`) c ORDER BY time, origin, kind, namespace, name, revision LIMIT %d`, q.o.ChangesLimit+1), a.args...)
	if err != nil {
		return err
	}
	c.Changes, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (Change, error) {
		var x Change
		var diff string
		err := r.Scan(&x.Time, &x.Origin, &x.Kind, &x.Namespace, &x.Name, &x.Revision, &x.Op, &x.Author, &diff)
		x.Time = x.Time.UTC()
		x.Added, x.Removed = diffStat(diff)
		return x, err
	})
	if err != nil {
		return err
	}
	if len(c.Changes) > q.o.ChangesLimit {
		c.Changes, c.Truncated = c.Changes[:q.o.ChangesLimit], true
	}
	if c.Changes == nil {
		c.Changes = []Change{}
	}
	c.Returned = len(c.Changes)
	return nil
}

// diffStat counts the added and removed lines of a line diff
// (xds.LineDiff: "+ " and "- " prefixes).
func diffStat(diff string) (added, removed int) {
	for l := range strings.SplitSeq(diff, "\n") {
		switch {
		case strings.HasPrefix(l, "+"):
			added++
		case strings.HasPrefix(l, "-"):
			removed++
		}
	}
	return added, removed
}

// issuanceSQL selects certificate issuance from both places as (at, kind,
// outcome, serial, spiffe_id, not_after); inRange limits it to the
// report's range, scoped to the options.
func (q *querier) issuanceSQL(a *sqlArgs, inRange bool) string {
	log := `SELECT at, kind, outcome, coalesce(serial, '') AS serial, coalesce(spiffe_id, '') AS spiffe_id, not_after FROM issuance_log WHERE true`
	ev := fmt.Sprintf(`SELECT c.time, coalesce(c.attributes->>'kind', 'x509-svid'),
			CASE c.kind WHEN 'cert_issued' THEN 'issued' WHEN 'cert_renewed' THEN 'renewed' ELSE 'refused' END,
			c.resource, c.destination,
			CASE WHEN c.attributes->>'not_after' ~ %s THEN (c.attributes->>'not_after')::timestamptz END
		FROM audit_events c WHERE c.kind IN ('cert_issued', 'cert_renewed', 'cert_refused')
		AND NOT (c.resource <> '' AND EXISTS (SELECT 1 FROM issuance_log i WHERE i.serial = c.resource))
		-- writd records every issuance_log row as an event of its own
		-- chain in the same transaction (refusals have no serial to match)
		AND c.source NOT LIKE 'spiffe://%%/writ/control-plane#%%'`, rfc3339Re)
	if inRange {
		from, to := a.p(q.o.From), a.p(q.o.To)
		log += fmt.Sprintf(" AND at >= %s AND at < %s", from, to)
		ev += fmt.Sprintf(" AND c.time >= %s AND c.time < %s", from, to)
		if cond := q.idInScope(a, "spiffe_id"); cond != "" {
			log += " AND " + cond
			ev += " AND " + strings.ReplaceAll(cond, "spiffe_id", "c.destination")
		}
	}
	return log + " UNION ALL " + ev
}

func (q *querier) certificates(ctx context.Context, s *Sections) error {
	c := &s.Certificates
	a := &sqlArgs{}
	rows, err := q.db.Query(ctx, `SELECT kind, count(*) FILTER (WHERE outcome = 'issued'), count(*) FILTER (WHERE outcome = 'renewed'),
		count(*) FILTER (WHERE outcome = 'refused'), count(*) FILTER (WHERE outcome = 'used'),
		coalesce(extract(epoch FROM max(not_after - at) FILTER (WHERE outcome IN ('issued', 'renewed')))::bigint, 0)
		FROM (`+q.issuanceSQL(a, true)+`) i GROUP BY kind ORDER BY kind`, a.args...)
	if err != nil {
		return err
	}
	if c.ByKind, err = pgx.CollectRows(rows, pgx.RowToStructByPos[CertKind]); err != nil {
		return err
	}
	for _, k := range c.ByKind {
		c.Issued += k.Issued
		c.Renewed += k.Renewed
		c.Refused += k.Refused
	}
	a = &sqlArgs{}
	var l Lifetime
	err = q.db.QueryRow(ctx, `SELECT kind, serial, spiffe_id, at, not_after, extract(epoch FROM not_after - at)::bigint
		FROM (`+q.issuanceSQL(a, true)+`) i WHERE outcome IN ('issued', 'renewed') AND not_after IS NOT NULL AND kind <> 'intermediate'
		ORDER BY not_after - at DESC, at, serial LIMIT 1`, a.args...).Scan(&l.Kind, &l.Serial, &l.SPIFFEID, &l.IssuedAt, &l.NotAfter, &l.Seconds)
	switch err {
	case nil:
		l.IssuedAt, l.NotAfter = l.IssuedAt.UTC(), l.NotAfter.UTC()
		c.Longest = &l
	case pgx.ErrNoRows:
	default:
		return err
	}
	return q.expiredInUse(ctx, s)
}

// expiredInUse finds mTLS requests whose caller's certificate had
// expired: by the NotAfter the enforcer recorded (attribute
// peer_cert_not_after) where there is one, else derived: no X.509 SVID
// for the caller on record (issuance_log or cert events, any time before)
// was valid at the request's time.
func (q *querier) expiredInUse(ctx context.Context, s *Sections) error {
	x := &s.Certificates.ExpiredInUse
	x.Checked = s.MTLS.MTLS
	a := &sqlArgs{}
	base := q.requests(a) + " AND " + mtlsExpr
	if err := q.db.QueryRow(ctx, `SELECT count(*) `+base+` AND e.attributes ? 'peer_cert_not_after'`, a.args...).Scan(&x.Recorded); err != nil {
		return err
	}
	switch {
	case x.Checked == 0 || x.Recorded == 0:
		x.Method = "derived"
	case x.Recorded == x.Checked:
		x.Method = "recorded"
	default:
		x.Method = "recorded+derived"
	}
	// Derived: a request is covered when some certificate of its caller
	// was issued at or before it and expires after it, that is when the
	// latest expiry among the caller's certificates issued up to the
	// request's time is past it. One pass over the caller's certificates
	// and requests in time order computes that running maximum (a
	// correlated lookup per request would cost requests x certificates).
	a = &sqlArgs{}
	base = q.requests(a) + " AND " + mtlsExpr
	iss := q.issuanceSQL(a, false)
	sql := fmt.Sprintf(`WITH ev AS MATERIALIZED (SELECT e.principal, e.time, e.attributes->>'peer_cert_not_after' AS nat %[1]s),
		u AS (
			SELECT i.spiffe_id AS principal, i.at AS time, i.not_after, false AS is_event
			FROM (%[2]s) i WHERE i.kind IN ('x509-svid', 'node-svid') AND i.outcome IN ('issued', 'renewed') AND i.not_after IS NOT NULL
				AND i.spiffe_id IN (SELECT DISTINCT principal FROM ev)
			UNION ALL
			SELECT principal, time, NULL, true FROM ev WHERE NOT (nat IS NOT NULL AND nat ~ %[3]s)),
		w AS (SELECT principal, time, is_event,
			max(not_after) OVER (PARTITION BY principal ORDER BY time, is_event ROWS UNBOUNDED PRECEDING) AS cover FROM u),
		f AS (
			SELECT principal, time, 'derived' AS basis FROM w WHERE is_event AND (cover IS NULL OR cover <= time)
			UNION ALL
			SELECT principal, time, 'recorded' FROM ev WHERE nat ~ %[3]s AND time > nat::timestamptz)
		SELECT principal, basis, count(*), min(time), max(time) FROM f GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 1000`,
		base, iss, rfc3339Re)
	rows, err := q.db.Query(ctx, sql, a.args...)
	if err != nil {
		return err
	}
	x.Findings, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (ExpiredFinding, error) {
		var f ExpiredFinding
		err := r.Scan(&f.Principal, &f.Basis, &f.Requests, &f.First, &f.Last)
		f.First, f.Last = f.First.UTC(), f.Last.UTC()
		return f, err
	})
	if x.Findings == nil {
		x.Findings = []ExpiredFinding{}
	}
	return err
}

func (q *querier) mtls(ctx context.Context, s *Sections) error {
	m := &s.MTLS
	a := &sqlArgs{}
	if err := q.db.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE `+mtlsExpr+`) `+q.requests(a), a.args...).Scan(&m.Requests, &m.MTLS); err != nil {
		return err
	}
	m.Plaintext = m.Requests - m.MTLS
	if m.Requests > 0 {
		m.Share = float64(m.MTLS) / float64(m.Requests)
	}
	a = &sqlArgs{}
	rows, err := q.db.Query(ctx, `SELECT principal, destination, count(*), count(*) FILTER (WHERE result = 'deny'), min(time), max(time) `+
		q.requests(a)+` AND NOT `+mtlsExpr+` GROUP BY 1, 2 ORDER BY 3 DESC, 2, 1 LIMIT 1001`, a.args...)
	if err != nil {
		return err
	}
	m.Attempts, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (PlaintextAttempt, error) {
		var p PlaintextAttempt
		err := r.Scan(&p.Source, &p.Destination, &p.Requests, &p.Denied, &p.First, &p.Last)
		p.First, p.Last = p.First.UTC(), p.Last.UTC()
		return p, err
	})
	if err != nil {
		return err
	}
	if len(m.Attempts) > 1000 {
		m.Attempts, m.Truncated = m.Attempts[:1000], true
	}
	if m.Attempts == nil {
		m.Attempts = []PlaintextAttempt{}
	}
	return nil
}

// adminSQL selects admin calls and logins in range as (time, origin,
// actor, method, path, status, result, failed). Admin access is not
// scoped: the admin API acts on the whole mesh.
func (q *querier) adminSQL(a *sqlArgs) string {
	from, to := a.p(q.o.From), a.p(q.o.To)
	return fmt.Sprintf(`SELECT at AS time, 'admin_events' AS origin, actor, method, path, status,
			CASE WHEN status < 400 THEN 'ok' ELSE 'error' END AS result, status >= 400 AS failed
		FROM admin_events WHERE at >= %[1]s AND at < %[2]s
		UNION ALL
		SELECT e.time, 'audit_events', e.principal, e.action, e.resource, e.status, e.result, e.result NOT IN ('ok', 'allow')
		FROM audit_events e WHERE e.kind = 'login' AND e.time >= %[1]s AND e.time < %[2]s`, from, to)
}

func (q *querier) adminAccess(ctx context.Context, s *Sections) error {
	ad := &s.AdminAccess
	a := &sqlArgs{}
	rows, err := q.db.Query(ctx, `SELECT actor, count(*), count(*) FILTER (WHERE failed) FROM (`+q.adminSQL(a)+`) x GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1000`, a.args...)
	if err != nil {
		return err
	}
	if ad.ByActor, err = pgx.CollectRows(rows, pgx.RowToStructByPos[ActorCount]); err != nil {
		return err
	}
	a = &sqlArgs{}
	if err := q.db.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE failed) FROM (`+q.adminSQL(a)+`) x`, a.args...).Scan(&ad.Total, &ad.Failed); err != nil {
		return err
	}
	a = &sqlArgs{}
	rows, err = q.db.Query(ctx, `SELECT time, origin, actor, method, path, status, result FROM (`+q.adminSQL(a)+
		fmt.Sprintf(`) x ORDER BY time, origin, actor, path LIMIT %d`, q.o.AdminLimit+1), a.args...)
	if err != nil {
		return err
	}
	ad.Events, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (AdminEvent, error) {
		var x AdminEvent
		var st int32
		err := r.Scan(&x.Time, &x.Origin, &x.Actor, &x.Method, &x.Path, &st, &x.Result)
		x.Time, x.Status = x.Time.UTC(), int(st)
		return x, err
	})
	if err != nil {
		return err
	}
	if len(ad.Events) > q.o.AdminLimit {
		ad.Events, ad.Truncated = ad.Events[:q.o.AdminLimit], true
	}
	if ad.Events == nil {
		ad.Events = []AdminEvent{}
	}
	ad.Returned = len(ad.Events)
	return nil
}

func (q *querier) integrity(ctx context.Context, s *Sections) error {
	res, err := collector.Verify(ctx, q.pool, collector.VerifyOptions{From: q.o.From, To: q.o.To, Roots: q.o.Roots, Signer: q.o.Signer})
	if err != nil {
		return err
	}
	s.Integrity = Integrity{OK: res.OK(), Events: res.Events, Sources: res.Sources, Checkpoints: res.Checkpoints,
		Signatures: q.o.Roots != nil, Breaks: res.Breaks}
	if s.Integrity.Breaks == nil {
		s.Integrity.Breaks = []collector.Break{}
	}
	return nil
}
