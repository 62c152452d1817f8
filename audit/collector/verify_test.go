package collector_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
)

// seed puts n chained events of one source into the database.
func seed(t *testing.T, r *rig, n int) string {
	t.Helper()
	src := "spiffe://example.org/ns/a/sa/proxy"
	s, err := audit.OpenSpool(audit.SpoolOptions{Dir: t.TempDir(), Source: src, Durability: audit.DurabilityGrouped})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	appendN(t, s, n)
	_ = s.Sync()
	var rd audit.Reader
	defer rd.Close()
	raws, err := s.ReadBatch(&rd, 1, n, 1<<22)
	if err != nil || len(raws) != n {
		t.Fatalf("read %d: %v", len(raws), err)
	}
	evs, err := audit.DecodeBatch(audit.EncodeBatch(raws))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.col.Insert(context.Background(), evs); err != nil {
		t.Fatal(err)
	}
	return src
}

// tamper runs SQL with the append-only trigger disabled, as a superuser
// attacking the table directly could.
func tamper(t *testing.T, r *rig, sql ...string) {
	t.Helper()
	ctx := context.Background()
	conn, err := r.env.Pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "SET session_replication_role = replica"); err != nil {
		t.Fatal(err)
	}
	defer conn.Exec(ctx, "SET session_replication_role = origin")
	for _, q := range sql {
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

func TestVerifyCatchesTampering(t *testing.T) {
	tests := []struct {
		name    string
		sql     []string
		wantSeq uint64
		want    string
	}{
		{"update", []string{"UPDATE audit_events SET result = 'deny' WHERE seq = 5"}, 5, "altered"},
		{"update attributes", []string{`UPDATE audit_events SET attributes = '{"n":2}' WHERE seq = 6`}, 6, "altered"},
		{"delete", []string{"DELETE FROM audit_events WHERE seq = 7"}, 7, "missing"},
		{"delete first", []string{"DELETE FROM audit_events WHERE seq = 1"}, 1, "missing"},
		{"delete tail", []string{"DELETE FROM audit_events WHERE seq >= 19"}, 19, "end of the chain"},
		{"insert", []string{`INSERT INTO audit_events SELECT gen_random_uuid(), time, kind, source, seq, prev_hash, hash,
			principal, destination, action, resource, 'deny', status, reason, cause, policy_revision, trace_id, attributes, received_at
			FROM audit_events WHERE seq = 10`}, 10, "altered|repeated"},
		{"reorder", []string{"UPDATE audit_events SET seq = -1 WHERE seq = 3", "UPDATE audit_events SET seq = 3 WHERE seq = 4", "UPDATE audit_events SET seq = 4 WHERE seq = -1"}, 3, "altered"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := startRig(t)
			seed(t, r, 20)
			res, err := collector.Verify(context.Background(), r.env.Pool, collector.VerifyOptions{})
			if err != nil || !res.OK() || res.Events != 20 {
				t.Fatalf("before tampering: %+v, %v", res, err)
			}
			tamper(t, r, tc.sql...)
			res, err = collector.Verify(context.Background(), r.env.Pool, collector.VerifyOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Breaks) == 0 {
				t.Fatal("tampering not detected")
			}
			b := res.Breaks[0]
			matched := false
			for _, w := range strings.Split(tc.want, "|") {
				matched = matched || strings.Contains(b.Problem, w)
			}
			if b.Seq != tc.wantSeq || !matched {
				t.Fatalf("first break %+v, want seq %d and %q", b, tc.wantSeq, tc.want)
			}
		})
	}
}

var cpID = authority.ControlPlaneID(authoritytest.TrustDomain).String()

func roots(t *testing.T, r *rig) *x509.CertPool {
	t.Helper()
	p := x509.NewCertPool()
	for _, c := range r.env.Bundle(t).X509Authorities() {
		p.AddCert(c)
	}
	return p
}

// TestSignedCheckpointsCatchWhatChainsCannot covers attacks that keep every
// chain consistent: cutting the tail and fixing audit_sources, or
// rewriting the last event with a recomputed hash. Only the signed
// checkpoint shows them.
func TestSignedCheckpointsCatchWhatChainsCannot(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name   string
		attack func(t *testing.T, r *rig, src string)
		want   string
	}{
		{"cut tail and fix heads", func(t *testing.T, r *rig, src string) {
			tamper(t, r, "DELETE FROM audit_events WHERE seq >= 19",
				"UPDATE audit_sources SET last_seq = 18, last_hash = (SELECT hash FROM audit_events WHERE seq = 18)")
		}, "missing"},
		{"rewrite last event", func(t *testing.T, r *rig, src string) {
			evs, err := collector.Events(ctx, r.env.Pool, src)
			if err != nil {
				t.Fatal(err)
			}
			last := evs[len(evs)-1]
			last.Result = "deny"
			last.Seal()
			h := hex.EncodeToString(last.Hash[:])
			tamper(t, r, "UPDATE audit_events SET result = 'deny', hash = '\\x"+h+"' WHERE seq = 20",
				"UPDATE audit_sources SET last_hash = '\\x"+h+"'")
		}, "differs from signed checkpoint"},
		{"checkpoint by a workload", func(t *testing.T, r *rig, src string) {
			// A compromised workload's key chains to the same roots.
			svid := r.env.Attest(t, "evil")
			cert := &tls.Certificate{PrivateKey: svid.PrivateKey}
			for _, c := range svid.Certificates {
				cert.Certificate = append(cert.Certificate, c.Raw)
			}
			tamper(t, r, "DELETE FROM audit_checkpoints", "DELETE FROM audit_events WHERE seq = 20",
				"UPDATE audit_sources SET last_seq = 19, last_hash = (SELECT hash FROM audit_events WHERE seq = 19)")
			forged := &collector.Checkpointer{Pool: r.env.Pool, Certificate: func() *tls.Certificate { return cert }}
			if ok, err := forged.Write(ctx); !ok || err != nil {
				t.Fatalf("forged checkpoint: %v %v", ok, err)
			}
		}, "not by " + cpID},
		{"alter checkpoint", func(t *testing.T, r *rig, src string) {
			tamper(t, r, `UPDATE audit_checkpoints SET body = convert_to(replace(convert_from(body, 'UTF8'), '"seq":20', '"seq":18'), 'UTF8')`)
		}, "signature does not verify"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := startRig(t)
			src := seed(t, r, 20)
			cp := &collector.Checkpointer{Pool: r.env.Pool, Certificate: r.env.Identity.Certificate}
			if ok, err := cp.Write(ctx); err != nil || !ok {
				t.Fatalf("checkpoint: %v %v", ok, err)
			}
			if ok, _ := cp.Write(ctx); ok {
				t.Fatal("a checkpoint of unchanged heads was written")
			}
			res, err := collector.Verify(ctx, r.env.Pool, collector.VerifyOptions{Roots: roots(t, r), Signer: cpID})
			if err != nil || !res.OK() || res.Checkpoints != 1 {
				t.Fatalf("before: %+v %v", res, err)
			}
			tc.attack(t, r, src)
			if res, _ := collector.Verify(ctx, r.env.Pool, collector.VerifyOptions{}); !res.OK() {
				t.Fatalf("the attack should keep the chains consistent, but: %+v", res.Breaks)
			}
			res, err = collector.Verify(ctx, r.env.Pool, collector.VerifyOptions{Roots: roots(t, r), Signer: cpID})
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, b := range res.Breaks {
				found = found || strings.Contains(b.Problem, tc.want)
			}
			if !found {
				t.Fatalf("breaks %+v, want one saying %q", res.Breaks, tc.want)
			}
		})
	}
}
