package compliance_test

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/csv"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/compliance"
	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/xds"
)

const (
	idA      = "spiffe://example.org/ns/shop/sa/web"
	idB      = "spiffe://example.org/ns/shop/sa/cart"
	idC      = "spiffe://example.org/ns/pay/sa/api"
	recorder = "spiffe://example.org/node/n1"
	replica  = "spiffe://example.org/writ/control-plane/replica/r1"
	signer   = "spiffe://example.org/writ/control-plane"
)

var (
	from = time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	to   = time.Date(2026, 3, 4, 0, 0, 0, 0, time.UTC)
)

func at(day, h, m int) time.Time { return time.Date(2026, 3, day, h, m, 0, 0, time.UTC) }

type decision struct {
	t                   time.Time
	src, dst, result    string
	attrs               map[string]any
	kind                string
	status              int
	reason, policyRev   string
	method, path, cause string
}

const meshV1 = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: greeter, namespace: demo}
spec:
  ports: [{port: 50051, protocol: grpc}]
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: greeter, namespace: demo}
spec:
  service: greeter
  rules:
    - destinations:
        - {subset: v1, weight: 80}
        - {subset: v2, weight: 20}
`

// seed fills the database with the dataset every figure below is
// computed from by hand, through the paths that write it in production:
// the collector's COPY insert for enforcers' decisions, Record for what
// writd records itself, the registry's issuance log, and the mesh store.
// Admin calls go in by SQL because admin_events stamps them with now().
func seed(t *testing.T, env *authoritytest.Env) {
	t.Helper()
	ctx := context.Background()
	col, err := collector.New(collector.Options{Pool: env.Pool})
	if err != nil {
		t.Fatal(err)
	}
	ds := []decision{
		{t: time.Date(2026, 2, 28, 23, 59, 0, 0, time.UTC), src: idA, dst: idB, result: "allow"}, // before the range
		{t: at(1, 10, 0), src: idA, dst: idB, result: "allow"},
		{t: at(1, 10, 1), src: idA, dst: idB, result: "allow"},
		{t: at(1, 10, 2), src: idA, dst: idB, result: "allow"},
		{t: at(1, 11, 0), src: idA, dst: idC, result: "deny", status: 403, reason: "policy denied", path: "/pay"},
		{t: at(1, 11, 1), src: idA, dst: idC, result: "deny", status: 403, reason: "policy denied", path: "/pay"},
		{t: at(2, 9, 0), src: idB, dst: idC, result: "allow"},
		{t: at(2, 12, 0), src: "", dst: idB, result: "deny", status: 403, reason: "no peer identity", cause: "unauthenticated"},
		{t: at(2, 13, 0), src: idA, dst: idC, result: "allow", attrs: map[string]any{"mtls": false}},
		{t: at(2, 10, 0), src: idA, dst: idC, result: "allow", kind: audit.KindDecisionAPI},
		{t: at(3, 8, 0), src: idC, dst: idA, result: "deny", status: 403, reason: "=cmd|' /C calc'!A0", attrs: map[string]any{"peer_cert_not_after": "2026-03-03T07:00:00Z"}},
		{t: at(4, 0, 0), src: idA, dst: idB, result: "allow"}, // the range's end is exclusive
	}
	var evs []audit.Event
	var prev audit.Hash
	for i, d := range ds {
		kind := d.kind
		if kind == "" {
			kind = audit.KindRequest
		}
		ev, err := audit.NewEvent(kind, d.t)
		if err != nil {
			t.Fatal(err)
		}
		ev.Principal, ev.Destination, ev.Result, ev.Status, ev.Reason, ev.Cause = d.src, d.dst, d.result, d.status, d.reason, d.cause
		ev.Action, ev.Resource, ev.PolicyRevision = "GET", "/", "rev-7"
		if d.path != "" {
			ev.Resource = d.path
		}
		if ev.Status == 0 {
			ev.Status = 200
		}
		attrs := map[string]any{"protocol": "HTTP/2"}
		for k, v := range d.attrs {
			attrs[k] = v
		}
		if err := ev.SetAttributes(attrs); err != nil {
			t.Fatal(err)
		}
		ev.Source, ev.Seq, ev.PrevHash = recorder, uint64(i+1), prev
		ev.Seal()
		prev = ev.Hash
		evs = append(evs, ev)
	}
	if err := col.Insert(ctx, evs); err != nil {
		t.Fatal(err)
	}

	record := func(kind string, tm time.Time, principal, dest, action, resource, result string, status int, attrs map[string]any) {
		t.Helper()
		ev, err := audit.NewEvent(kind, tm)
		if err != nil {
			t.Fatal(err)
		}
		ev.Principal, ev.Destination, ev.Action, ev.Resource, ev.Result, ev.Status = principal, dest, action, resource, result, status
		if err := ev.SetAttributes(attrs); err != nil {
			t.Fatal(err)
		}
		if err := col.Record(ctx, replica, &ev); err != nil {
			t.Fatal(err)
		}
	}
	// Certificates: A's first SVID covers 10:00 and 10:01 but not 10:02;
	// its renewal at 11:00:30 misses 11:00 but covers 11:01. B's covers
	// 09:00 on the 2nd. C's expiry was recorded with the decision.
	iss := []authority.Issuance{
		{At: time.Date(2026, 2, 27, 9, 0, 0, 0, time.UTC), Kind: "x509-svid", Outcome: "issued", Serial: "a-0", SPIFFEID: idA, NotAfter: time.Date(2026, 2, 28, 9, 0, 0, 0, time.UTC)},
		{At: at(1, 0, 0), Kind: "intermediate", Outcome: "issued", Serial: "i-1", NotAfter: at(31, 0, 0)},
		{At: at(1, 0, 0), Kind: "node-svid", Outcome: "issued", Serial: "n-1", SPIFFEID: recorder, NotAfter: at(2, 0, 0)},
		{At: at(1, 9, 0), Kind: "x509-svid", Outcome: "issued", Serial: "a-1", SPIFFEID: idA, NotAfter: time.Date(2026, 3, 1, 10, 1, 30, 0, time.UTC)},
		{At: time.Date(2026, 3, 1, 11, 0, 30, 0, time.UTC), Kind: "x509-svid", Outcome: "renewed", Serial: "a-2", SPIFFEID: idA, NotAfter: time.Date(2026, 3, 1, 12, 0, 30, 0, time.UTC)},
		{At: at(2, 8, 0), Kind: "x509-svid", Outcome: "refused", SPIFFEID: idB, Reason: "no entry"},
		{At: at(2, 8, 30), Kind: "x509-svid", Outcome: "issued", Serial: "b-1", SPIFFEID: idB, NotAfter: at(2, 9, 30)},
	}
	if err := env.Registry.RecordIssuance(ctx, iss...); err != nil {
		t.Fatal(err)
	}
	// The same issuance recorded as an audit event is counted once; one
	// known only from its audit event counts.
	record(audit.KindCertIssued, at(1, 9, 0), "writd", idA, "sign", "a-1", "ok", 0, map[string]any{"not_after": "2026-03-01T10:01:30Z"})
	record(audit.KindCertIssued, at(2, 0, 0), "writd", idC, "sign", "c-1", "ok", 0, map[string]any{"not_after": "2026-03-02T02:00:00Z"})

	// Changes: two resources created by uid:1, one updated by uid:2, one
	// after the range; a policy change known only as an audit event, and a
	// config_change event for a revision mesh_revisions already has.
	clock := clockwork.NewFakeClockAt(at(1, 12, 0))
	store := xds.NewStore(env.Pool, clock)
	mustApply := func(author, y string) {
		t.Helper()
		rs, err := config.DecodeMesh("test.yaml", []byte(y))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := store.Apply(ctx, author, rs, false); err != nil {
			t.Fatal(err)
		}
	}
	mustApply("uid:1", meshV1)
	clock.Advance(24 * time.Hour)
	meshV2 := strings.Replace(strings.Replace(meshV1, "weight: 80", "weight: 50", 1), "weight: 20", "weight: 50", 1)
	mustApply("uid:2", meshV2)
	clock.Advance(72 * time.Hour)
	mustApply("uid:3", strings.Replace(meshV2, "port: 50051", "port: 50052", 1))
	record(audit.KindPolicyChange, at(3, 1, 0), "alice@example.org", "policy/authz", "apply", "authz.rego", "ok", 0,
		map[string]any{"kind": "Policy", "name": "authz", "revision": 4, "diff": "+ allow if x\n+ allow if y\n- allow if z\n"})
	record(audit.KindConfigChange, at(2, 12, 0), "uid:2", "Route/demo/greeter", "apply", "greeter", "ok", 0,
		map[string]any{"kind": "Route", "namespace": "demo", "name": "greeter", "revision": 2})

	// Admin access.
	for _, a := range []struct {
		t      time.Time
		actor  string
		method string
		path   string
		status int
	}{
		{at(1, 8, 0), "uid:0", "GET", "/v1/whoami", 200},
		{at(2, 8, 0), "uid:1000", "POST", "/v1/entries", 403},
		{at(2, 9, 0), "uid:0", "POST", "/v1/join-tokens", 200},
		{at(5, 9, 0), "uid:0", "GET", "/v1/bundle", 200},
	} {
		if _, err := env.Pool.Exec(ctx, `INSERT INTO admin_events (at, actor, method, path, status) VALUES ($1, $2, $3, $4, $5)`, a.t, a.actor, a.method, a.path, a.status); err != nil {
			t.Fatal(err)
		}
	}
	record(audit.KindLogin, at(3, 2, 0), "alice@example.org", "console", "login", "/console", "ok", 200, nil)
	record(audit.KindLogin, at(3, 3, 0), "mallory", "console", "login", "/console", "deny", 401, nil)
}

func roots(t *testing.T, env *authoritytest.Env) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range env.Bundle(t).X509Authorities() {
		p.AddCert(c)
	}
	return p
}

var generatedAt = time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC)

func generate(t *testing.T, env *authoritytest.Env, o compliance.Options) *compliance.Report {
	t.Helper()
	o.From, o.To, o.Now, o.Generator = from, to, generatedAt, "test-replica"
	o.Roots, o.Signer = roots(t, env), signer
	var steps []string
	o.Progress = func(s string, _, _ int) { steps = append(steps, s) }
	r, err := compliance.Generate(context.Background(), env.Pool, o)
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 7 {
		t.Errorf("progress steps: got %v, want 7", steps)
	}
	return r
}

func TestReportFigures(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	seed(t, env)
	r := generate(t, env, compliance.Options{})
	s := r.Sections

	d := s.Decisions
	if d.Total != 9 || d.Allow != 5 || d.Deny != 4 || d.DecisionAPI != 1 {
		t.Errorf("decisions: got total %d allow %d deny %d api %d, want 9 5 4 1", d.Total, d.Allow, d.Deny, d.DecisionAPI)
	}
	wantPairs := []compliance.Pair{{"", idB, 0, 1}, {idB, idC, 1, 0}, {idA, idC, 1, 2}, {idA, idB, 3, 0}, {idC, idA, 0, 1}}
	// ORDER BY source, destination in the database's collation; compare
	// as sets keyed by pair.
	if got := pairMap(d.Pairs); !reflect.DeepEqual(got, pairMap(wantPairs)) || len(d.Pairs) != 5 {
		t.Errorf("pairs: got %+v, want %+v", d.Pairs, wantPairs)
	}
	wantDays := []compliance.Day{{"2026-03-01", 3, 2}, {"2026-03-02", 2, 1}, {"2026-03-03", 0, 1}}
	if !reflect.DeepEqual(d.ByDay, wantDays) {
		t.Errorf("by day: got %+v, want %+v", d.ByDay, wantDays)
	}

	dn := s.Denied
	if dn.Total != 4 || dn.Returned != 4 || dn.Truncated || len(dn.Requests) != 4 {
		t.Fatalf("denied: got %+v", dn)
	}
	wantDenied := []struct {
		t        time.Time
		src, dst string
	}{{at(1, 11, 0), idA, idC}, {at(1, 11, 1), idA, idC}, {at(2, 12, 0), "", idB}, {at(3, 8, 0), idC, idA}}
	for i, w := range wantDenied {
		g := dn.Requests[i]
		if !g.Time.Equal(w.t) || g.Source != w.src || g.Destination != w.dst || g.Status != 403 || g.PolicyRevision != "rev-7" {
			t.Errorf("denied[%d]: got %+v, want %v %s -> %s", i, g, w.t, w.src, w.dst)
		}
	}

	m := s.MTLS
	if m.Requests != 9 || m.MTLS != 7 || m.Plaintext != 2 || m.Share != 7.0/9.0 {
		t.Errorf("mtls: got %d/%d plaintext %d share %v, want 7/9, 2", m.MTLS, m.Requests, m.Plaintext, m.Share)
	}
	// One request each: ordered by destination (pay before shop).
	if len(m.Attempts) != 2 || m.Attempts[1].Destination != idB || m.Attempts[1].Source != "" || m.Attempts[1].Denied != 1 ||
		m.Attempts[0].Source != idA || m.Attempts[0].Destination != idC || m.Attempts[0].Denied != 0 || !m.Attempts[0].First.Equal(at(2, 13, 0)) {
		t.Errorf("plaintext attempts: got %+v", m.Attempts)
	}

	c := s.Certificates
	if c.Issued != 5 || c.Renewed != 1 || c.Refused != 1 {
		t.Errorf("certificates: got issued %d renewed %d refused %d, want 5 1 1", c.Issued, c.Renewed, c.Refused)
	}
	wantKinds := []compliance.CertKind{
		{Kind: "intermediate", Issued: 1, LongestLifetimeSeconds: 30 * 86400},
		{Kind: "node-svid", Issued: 1, LongestLifetimeSeconds: 86400},
		{Kind: "x509-svid", Issued: 3, Renewed: 1, Refused: 1, LongestLifetimeSeconds: 7200},
	}
	if !reflect.DeepEqual(c.ByKind, wantKinds) {
		t.Errorf("by kind: got %+v, want %+v", c.ByKind, wantKinds)
	}
	if l := c.Longest; l == nil || l.Serial != "n-1" || l.Seconds != 86400 || l.Kind != "node-svid" || !l.IssuedAt.Equal(at(1, 0, 0)) {
		t.Errorf("longest: got %+v, want n-1, 24h", l)
	}
	x := c.ExpiredInUse
	if x.Method != "recorded+derived" || x.Checked != 7 || x.Recorded != 1 {
		t.Errorf("expired in use: method %s checked %d recorded %d, want recorded+derived 7 1", x.Method, x.Checked, x.Recorded)
	}
	wantFindings := []compliance.ExpiredFinding{
		{Principal: idC, Basis: "recorded", Requests: 1, First: at(3, 8, 0), Last: at(3, 8, 0)},
		{Principal: idA, Basis: "derived", Requests: 2, First: at(1, 10, 2), Last: at(1, 11, 0)},
	}
	if len(x.Findings) != 2 || !reflect.DeepEqual(findingMap(x.Findings), findingMap(wantFindings)) {
		t.Errorf("findings: got %+v, want %+v", x.Findings, wantFindings)
	}

	ch := s.Changes
	if ch.Total != 4 || ch.Unattributed != 0 || ch.Returned != 4 {
		t.Fatalf("changes: got total %d unattributed %d returned %d, want 4 0 4", ch.Total, ch.Unattributed, ch.Returned)
	}
	wantAuthors := []compliance.Count{{Key: "uid:1", Count: 2}, {Key: "alice@example.org", Count: 1}, {Key: "uid:2", Count: 1}}
	if !reflect.DeepEqual(ch.ByAuthor, wantAuthors) {
		t.Errorf("by author: got %+v, want %+v", ch.ByAuthor, wantAuthors)
	}
	type chk struct {
		origin, kind, name, op, author string
		rev                            int64
	}
	var gotCh []chk
	for _, x := range ch.Changes {
		gotCh = append(gotCh, chk{x.Origin, x.Kind, x.Name, x.Op, x.Author, x.Revision})
	}
	wantCh := []chk{
		{"mesh_revisions", "Route", "greeter", "apply", "uid:1", 1},
		{"mesh_revisions", "Service", "greeter", "apply", "uid:1", 1},
		{"mesh_revisions", "Route", "greeter", "apply", "uid:2", 2},
		{"audit_events", "Policy", "authz", "apply", "alice@example.org", 4},
	}
	if !reflect.DeepEqual(gotCh, wantCh) {
		t.Errorf("changes: got %+v, want %+v", gotCh, wantCh)
	}
	if u := ch.Changes[2]; u.Added != 2 || u.Removed != 2 {
		t.Errorf("route update diff: got +%d -%d, want +2 -2", u.Added, u.Removed)
	}
	if p := ch.Changes[3]; p.Added != 2 || p.Removed != 1 {
		t.Errorf("policy diff: got +%d -%d, want +2 -1", p.Added, p.Removed)
	}
	if ch.Changes[0].Removed != 0 || ch.Changes[0].Added == 0 {
		t.Errorf("created route diff: got +%d -%d", ch.Changes[0].Added, ch.Changes[0].Removed)
	}

	ad := s.AdminAccess
	wantActors := []compliance.ActorCount{{"uid:0", 2, 0}, {"alice@example.org", 1, 0}, {"mallory", 1, 1}, {"uid:1000", 1, 1}}
	if ad.Total != 5 || ad.Failed != 2 || ad.Returned != 5 || !reflect.DeepEqual(ad.ByActor, wantActors) {
		t.Errorf("admin access: got total %d failed %d by actor %+v, want 5 2 %+v", ad.Total, ad.Failed, ad.ByActor, wantActors)
	}
	if e := ad.Events[0]; e.Actor != "uid:0" || e.Path != "/v1/whoami" || e.Origin != "admin_events" || !e.Time.Equal(at(1, 8, 0)) {
		t.Errorf("first admin event: got %+v", e)
	}

	in := s.Integrity
	// 10 requests and decision API answers in range from the recorder, and
	// 2 certificate, 2 change and 2 login events recorded by writd.
	if !in.OK || in.Events != 16 || in.Sources != 2 || !in.Signatures {
		t.Errorf("integrity: got %+v, want ok, 16 events, 2 sources", in)
	}

	status := map[string]string{}
	for _, c := range r.Controls {
		status[c.Framework+" "+c.ID] = c.Status
	}
	for k, want := range map[string]string{
		"soc2 CC6.1": "not_met", "soc2 CC7.2": "met", "soc2 CC8.1": "met", "iso27001 A.8.5": "not_met",
		"pci-dss-4 10.3": "met", "pci-dss-4 7.2": "evidence", "nist-800-53 AU-9": "met", "hipaa 164.312(e)(1)": "not_met",
	} {
		if status[k] != want {
			t.Errorf("control %s: got %q, want %q", k, status[k], want)
		}
	}
}

func pairMap(ps []compliance.Pair) map[[2]string][2]int64 {
	m := map[[2]string][2]int64{}
	for _, p := range ps {
		m[[2]string{p.Source, p.Destination}] = [2]int64{p.Allow, p.Deny}
	}
	return m
}

func findingMap(fs []compliance.ExpiredFinding) map[string]compliance.ExpiredFinding {
	m := map[string]compliance.ExpiredFinding{}
	for _, f := range fs {
		m[f.Principal] = f
	}
	return m
}

func TestReportScope(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	seed(t, env)
	tests := []struct {
		name                    string
		o                       compliance.Options
		total, allow, deny, api int64
		plaintext, changes      int64
		issued                  int64
	}{
		// cart (B): A->B x3, B->C, none->B; the route update mentions no
		// cart; B's SVID.
		{"service account name", compliance.Options{Service: "cart"}, 5, 4, 1, 0, 1, 0, 1},
		{"service SPIFFE ID", compliance.Options{Service: idB}, 5, 4, 1, 0, 1, 0, 1},
		// pay (C): A->C x3, B->C, C->A; the decision API answer A->C; C's SVID.
		{"namespace", compliance.Options{Namespace: "pay"}, 5, 2, 3, 1, 1, 0, 1},
		// demo namespace: no requests, the three mesh revisions.
		{"namespace with changes", compliance.Options{Namespace: "demo"}, 0, 0, 0, 0, 0, 3, 0},
		{"service greeter", compliance.Options{Service: "greeter"}, 0, 0, 0, 0, 0, 3, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := generate(t, env, tt.o).Sections
			if s.Decisions.Total != tt.total || s.Decisions.Allow != tt.allow || s.Decisions.Deny != tt.deny || s.Decisions.DecisionAPI != tt.api {
				t.Errorf("decisions: got %d/%d/%d api %d, want %d/%d/%d api %d", s.Decisions.Total, s.Decisions.Allow, s.Decisions.Deny, s.Decisions.DecisionAPI, tt.total, tt.allow, tt.deny, tt.api)
			}
			if s.MTLS.Plaintext != tt.plaintext || s.Changes.Total != tt.changes || s.Certificates.Issued != tt.issued {
				t.Errorf("plaintext %d changes %d issued %d, want %d %d %d", s.MTLS.Plaintext, s.Changes.Total, s.Certificates.Issued, tt.plaintext, tt.changes, tt.issued)
			}
		})
	}
}

func TestReportLimitsAndErrors(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	seed(t, env)
	r := generate(t, env, compliance.Options{DeniedLimit: 3})
	if d := r.Sections.Denied; d.Returned != 3 || !d.Truncated || d.Next == "" || d.Total != 4 {
		t.Fatalf("limited denied list: got %+v", d)
	}
	r2 := generate(t, env, compliance.Options{DeniedLimit: 3, DeniedAfter: r.Sections.Denied.Next})
	if d := r2.Sections.Denied; d.Returned != 1 || d.Truncated || d.Requests[0].Source != idC {
		t.Fatalf("second page: got %+v", d)
	}
	for _, tt := range []struct {
		name string
		o    compliance.Options
	}{
		{"no range", compliance.Options{}},
		{"reversed", compliance.Options{From: to, To: from}},
		{"too long", compliance.Options{From: from, To: from.Add(compliance.MaxRange + time.Hour)}},
		{"limit too big", compliance.Options{From: from, To: to, DeniedLimit: compliance.MaxListLimit + 1}},
		{"unknown framework", compliance.Options{From: from, To: to, Framework: "cobit"}},
		{"bad cursor", compliance.Options{From: from, To: to, DeniedAfter: "nope"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := compliance.Generate(context.Background(), env.Pool, tt.o)
			if !errors.Is(err, compliance.ErrBadOptions) {
				t.Errorf("got %v, want ErrBadOptions", err)
			}
		})
	}
	r3 := generate(t, env, compliance.Options{Framework: "soc2"})
	if len(r3.Controls) != 5 {
		t.Errorf("soc2 controls: got %d, want 5", len(r3.Controls))
	}
}

func TestReportSeesTampering(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	seed(t, env)
	ctx := context.Background()
	conn, err := env.Pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "SET session_replication_role = replica"); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "UPDATE audit_events SET result = 'allow' WHERE source = $1 AND seq = 5", recorder); err != nil {
		t.Fatal(err)
	}
	_, _ = conn.Exec(ctx, "SET session_replication_role = origin")
	conn.Release()
	r := generate(t, env, compliance.Options{Framework: "pci-dss-4"})
	in := r.Sections.Integrity
	if in.OK || len(in.Breaks) != 1 || in.Breaks[0].Seq != 5 || !strings.Contains(in.Breaks[0].Problem, "altered") {
		t.Fatalf("integrity after tampering: got %+v", in)
	}
	for _, c := range r.Controls {
		if c.ID == "10.3" && c.Status != compliance.StatusNotMet {
			t.Errorf("10.3 after tampering: got %s, want not_met", c.Status)
		}
	}
}

func TestExports(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	seed(t, env)
	r := generate(t, env, compliance.Options{})

	t.Run("json", func(t *testing.T) {
		b, err := compliance.Export(r, compliance.FormatJSON)
		if err != nil {
			t.Fatal(err)
		}
		var back compliance.Report
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if back.SchemaVersion != 1 || back.Sections.Decisions.Total != 9 || back.Sections.MTLS.Share != 7.0/9.0 || !back.Range.From.Equal(from) {
			t.Errorf("json round trip: got %+v", back.Sections.Decisions)
		}
		again, _ := compliance.Export(r, compliance.FormatJSON)
		if !bytes.Equal(b, again) {
			t.Error("json export is not reproducible")
		}
		checkSchemaCovers(t, b)
		validateSchema(t, b)
	})

	t.Run("csv", func(t *testing.T) {
		b, err := compliance.Export(r, compliance.FormatCSV)
		if err != nil {
			t.Fatal(err)
		}
		files, raw := readZip(t, b)
		// SHA256SUMS holds every CSV's hash, checked by sha256sum itself.
		dir := t.TempDir()
		for name, data := range raw {
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		cmd := exec.Command("sha256sum", "-c", "--strict", "SHA256SUMS")
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil || strings.Count(string(out), ": OK") != 11 {
			t.Errorf("sha256sum -c: %v\n%s", err, out)
		}
		want := []string{"report.csv", "decisions.csv", "decisions_by_day.csv", "denied.csv", "changes.csv", "certificates.csv",
			"expired_in_use.csv", "plaintext_attempts.csv", "admin_access.csv", "integrity_breaks.csv", "controls.csv"}
		for _, n := range want {
			if _, ok := files[n]; !ok {
				t.Errorf("csv export lacks %s", n)
			}
		}
		if len(files) != len(want) {
			t.Errorf("csv export has %d files, want %d", len(files), len(want))
		}
		if got := files["decisions_by_day.csv"]; !reflect.DeepEqual(got, [][]string{{"day", "allow", "deny"}, {"2026-03-01", "3", "2"}, {"2026-03-02", "2", "1"}, {"2026-03-03", "0", "1"}}) {
			t.Errorf("decisions_by_day.csv: got %v", got)
		}
		rep := map[string]string{}
		for _, row := range files["report.csv"][1:] {
			rep[row[0]] = row[1]
		}
		if rep["decisions_total"] != "9" || rep["plaintext_requests"] != "2" || rep["mtls_share"] != "0.777778" || rep["integrity_ok"] != "true" || rep["admin_calls"] != "5" {
			t.Errorf("report.csv: got %v", rep)
		}
		denied := files["denied.csv"]
		if len(denied) != 5 || denied[4][7] != "'=cmd|' /C calc'!A0" {
			t.Errorf("denied.csv: got %v (a formula-like reason must be defused)", denied)
		}
	})

	t.Run("pdf", func(t *testing.T) {
		b, err := compliance.Export(r, compliance.FormatPDF)
		if err != nil {
			t.Fatal(err)
		}
		if dir := os.Getenv("WRIT_REPORT_SAMPLE_DIR"); dir != "" {
			_ = os.WriteFile(filepath.Join(dir, "sample.pdf"), b, 0o644)
		}
		text := pdfText(t, b)
		first, _, _ := strings.Cut(text, "\f")
		for _, want := range []string{
			"Writ compliance report",
			"2026-03-01T00:00:00Z to 2026-03-04T00:00:00Z",
			"all services",
			"2026-03-10T00:00:00Z by test-replica",
			"INTACT: 16 events from 2 sources, 0 signed checkpoints",
			"9 requests: 5 allowed, 4 denied (and 1 decision API answers)",
			"77.78% of requests over mTLS (7 of 9); 2 plaintext",
			"5 issued, 1 renewed, 1 refused",
			"2 finding(s) (recorded+derived)",
			"5 calls and logins, 2 failed",
			"Decisions per day",
			"Page 1 of",
		} {
			if !strings.Contains(first, want) {
				t.Errorf("first page lacks %q:\n%s", want, first)
			}
		}
		for _, want := range []string{"Controls", "CC6.1", "A.8.24", "164.312(e)(1)", "SC-13", "not_met",
			"Decisions by service pair", "Denied requests (4, 4 listed)", "policy denied",
			"Configuration and policy changes (4, 4 listed)", "alice@example.org", "uid:2",
			"Certificate issuance and rotation", "node-svid", "24h0m0s", "Admin access (5, 2 failed, 5 listed)", "/v1/join-tokens", "mallory",
			"mTLS coverage", "Audit trail verification"} {
			if !strings.Contains(text, want) {
				t.Errorf("pdf lacks %q", want)
			}
		}
		pages := strings.Count(strings.TrimRight(text, "\f"), "\f") + 1
		if !strings.Contains(text, "Page "+itoa(pages)+" of "+itoa(pages)) {
			t.Errorf("pdf has %d pages but no %q", pages, "Page N of N")
		}
	})

	t.Run("unknown format", func(t *testing.T) {
		if _, err := compliance.Export(r, "xlsx"); !errors.Is(err, compliance.ErrBadOptions) {
			t.Errorf("got %v", err)
		}
	})
}

func itoa(n int) string { return strconv.Itoa(n) }

func readZip(t *testing.T, b []byte) (map[string][][]string, map[string][]byte) {
	t.Helper()
	zr, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][][]string{}
	raw := map[string][]byte{}
	for _, f := range zr.File {
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(rc)
		rc.Close()
		raw[f.Name] = data
		if f.Name == "SHA256SUMS" {
			continue
		}
		rows, err := csv.NewReader(bytes.NewReader(data)).ReadAll()
		if err != nil {
			t.Fatalf("%s: %v", f.Name, err)
		}
		out[f.Name] = rows
	}
	return out, raw
}

// pdfText extracts a PDF's text with poppler's pdftotext, as a reader's
// tools would. CI installs it (.ci/run); there a missing pdftotext fails.
func pdfText(t *testing.T, pdf []byte) string {
	t.Helper()
	bin, err := exec.LookPath("pdftotext")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("pdftotext (Debian poppler-utils) is required under CI")
		}
		t.Skip("pdftotext not installed: apt-get install poppler-utils")
	}
	path := filepath.Join(t.TempDir(), "r.pdf")
	if err := os.WriteFile(path, pdf, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "-layout", path, "-").Output()
	if err != nil {
		t.Fatalf("pdftotext: %v", err)
	}
	return string(out)
}

func TestSignature(t *testing.T) {
	env := authoritytest.Start(t, authoritytest.Options{})
	data := []byte(`{"report": "exact bytes"}` + "\n")
	sig, err := compliance.Sign(data, env.Identity.Certificate(), env.Clock.Now())
	if err != nil {
		t.Fatal(err)
	}
	pool := roots(t, env)
	s, err := compliance.VerifySignature(data, sig, pool, "example.org")
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if s.Signer != signer || s.Size != int64(len(data)) {
		t.Errorf("signature: got %+v", s)
	}
	for i := range data {
		bad := bytes.Clone(data)
		bad[i] ^= 0x01
		if _, err := compliance.VerifySignature(bad, sig, pool, ""); !errors.Is(err, compliance.ErrSignature) {
			t.Fatalf("byte %d flipped: got %v, want ErrSignature", i, err)
		}
	}
	if _, err := compliance.VerifySignature(append(bytes.Clone(data), ' '), sig, pool, ""); !errors.Is(err, compliance.ErrSignature) {
		t.Errorf("appended byte: got %v", err)
	}
	// An altered signature file: the time moved.
	var doc map[string]any
	_ = json.Unmarshal(sig, &doc)
	doc["signed_at"] = env.Clock.Now().Add(time.Minute).UTC().Format(time.RFC3339)
	alt, _ := json.Marshal(doc)
	if _, err := compliance.VerifySignature(data, alt, pool, ""); !errors.Is(err, compliance.ErrSignature) {
		t.Errorf("altered signed_at: got %v", err)
	}
	if _, err := compliance.VerifySignature(data, sig, pool, "other.org"); !errors.Is(err, compliance.ErrSignature) {
		t.Errorf("other trust domain expected: got %v", err)
	}

	t.Run("workload signer", func(t *testing.T) {
		svid := env.Attest(t, "n9")
		cert := &tls.Certificate{PrivateKey: svid.PrivateKey}
		for _, c := range svid.Certificates {
			cert.Certificate = append(cert.Certificate, c.Raw)
		}
		wsig, err := compliance.Sign(data, cert, env.Clock.Now())
		if err != nil {
			t.Fatal(err)
		}
		_, err = compliance.VerifySignature(data, wsig, pool, "")
		if !errors.Is(err, compliance.ErrSignature) || !strings.Contains(err.Error(), "not by writd's control plane") {
			t.Errorf("node-signed report: got %v", err)
		}
	})
	t.Run("other authority", func(t *testing.T) {
		other := authoritytest.Start(t, authoritytest.Options{})
		osig, err := compliance.Sign(data, other.Identity.Certificate(), other.Clock.Now())
		if err != nil {
			t.Fatal(err)
		}
		_, err = compliance.VerifySignature(data, osig, pool, "")
		if !errors.Is(err, compliance.ErrSignature) || !strings.Contains(err.Error(), "trust bundle") {
			t.Errorf("report signed under another CA: got %v", err)
		}
	})
}

// checkSchemaCovers walks the JSON export beside report.schema.json: every
// key the export has is declared, and every required key is present.
func checkSchemaCovers(t *testing.T, doc []byte) {
	t.Helper()
	raw, err := os.ReadFile("report.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	var schema, v map[string]any
	if err := json.Unmarshal(raw, &schema); err != nil {
		t.Fatalf("schema: %v", err)
	}
	if err := json.Unmarshal(doc, &v); err != nil {
		t.Fatal(err)
	}
	defs, _ := schema["$defs"].(map[string]any)
	var walk func(path string, s map[string]any, x any)
	walk = func(path string, s map[string]any, x any) {
		if alts, ok := s["oneOf"].([]any); ok && x != nil {
			for _, a := range alts {
				if am, _ := a.(map[string]any); am["$ref"] != nil {
					s = am
				}
			}
		}
		if ref, ok := s["$ref"].(string); ok {
			s, _ = defs[strings.TrimPrefix(ref, "#/$defs/")].(map[string]any)
			if s == nil {
				t.Errorf("%s: unknown $ref %s", path, ref)
				return
			}
		}
		switch x := x.(type) {
		case map[string]any:
			props, _ := s["properties"].(map[string]any)
			for k, val := range x {
				ps, ok := props[k].(map[string]any)
				if !ok {
					t.Errorf("%s.%s: not in the schema", path, k)
					continue
				}
				walk(path+"."+k, ps, val)
			}
			req, _ := s["required"].([]any)
			for _, k := range req {
				if _, ok := x[k.(string)]; !ok {
					t.Errorf("%s: required %s missing", path, k)
				}
			}
		case []any:
			items, _ := s["items"].(map[string]any)
			for i, e := range x {
				walk(path+"["+itoa(i)+"]", items, e)
			}
		}
	}
	walk("$", schema, v)
}

// validateSchema validates the JSON export against report.schema.json
// with a JSON Schema 2020-12 validator, formats (date-time) asserted.
func validateSchema(t *testing.T, doc []byte) {
	t.Helper()
	raw, err := os.ReadFile("report.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	sdoc, err := jsonschema.UnmarshalJSON(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	c.AssertFormat()
	if err := c.AddResource(compliance.SchemaID, sdoc); err != nil {
		t.Fatal(err)
	}
	sch, err := c.Compile(compliance.SchemaID)
	if err != nil {
		t.Fatalf("schema: %v", err)
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(doc))
	if err != nil {
		t.Fatal(err)
	}
	if err := sch.Validate(inst); err != nil {
		t.Errorf("the JSON export does not validate against its schema: %v", err)
	}
	// And the schema is not vacuous: a wrong type is refused.
	var m map[string]any
	_ = json.Unmarshal(doc, &m)
	m["schema_version"] = "one"
	bad, _ := json.Marshal(m)
	inst, _ = jsonschema.UnmarshalJSON(bytes.NewReader(bad))
	if err := sch.Validate(inst); err == nil {
		t.Error("schema accepted schema_version \"one\"")
	}
}
