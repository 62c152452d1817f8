package main

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/policy"
)

// spoolSink is the proxy's decision sink: the durable audit spool. The
// spool is named after the proxy's SVID, which arrives only after the
// enforcer is built, so the sink is filled in when Run has the SVID;
// until then it refuses, and a refusal denies (no request is served
// before then anyway). Safe for concurrent use.
type spoolSink struct {
	s atomic.Pointer[enforcer.AuditSink]

	mu      sync.Mutex
	pending []policy.ReloadEvent // reloads before the spool opened
	log     *slog.Logger
	policy  string
}

var _ enforcer.Sink = (*spoolSink)(nil)

func (k *spoolSink) Record(ctx context.Context, d enforcer.Decision) error {
	s := k.s.Load()
	if s == nil {
		return errors.New("audit spool not open yet")
	}
	return s.Record(ctx, d)
}

// openAudit opens the spool and shipper under the proxy's SVID and
// plugs the spool into the sink.
func (r *proxyRole) openAudit(src *workloadapi.X509Source, id spiffeid.ID) (*audit.Recorder, error) {
	clock := clockwork.NewRealClock()
	rec, err := audit.OpenRecorder(r.o.audit, audit.RecorderEnv{
		ID: id.String(), TLS: collectorTLS(src, id.TrustDomain(), clock),
		Clock: clock, Logger: r.log.With("component", "audit"), Registerer: r.reg,
	})
	if err != nil {
		return nil, err
	}
	r.sink.mu.Lock()
	r.sink.s.Store(&enforcer.AuditSink{Spool: rec.Spool, Redaction: rec.Redaction})
	pending := r.sink.pending
	r.sink.pending = nil
	r.sink.mu.Unlock()
	for _, ev := range pending {
		r.sink.recordReload(ev)
	}
	return rec, nil
}

// onReload records a policy reload (policy_change) in the spool; reloads
// before the spool is open (the first load, at start) wait for it.
func (k *spoolSink) onReload(ev policy.ReloadEvent) {
	k.mu.Lock()
	if k.s.Load() == nil {
		if len(k.pending) < 64 {
			k.pending = append(k.pending, ev)
		}
		k.mu.Unlock()
		return
	}
	k.mu.Unlock()
	k.recordReload(ev)
}

func (k *spoolSink) recordReload(r policy.ReloadEvent) {
	ev, err := enforcer.PolicyReloadEvent(k.policy, r)
	if err == nil {
		err = k.s.Load().Spool.Append(context.Background(), &ev)
	}
	if err != nil {
		k.log.Error("audit: policy reload not recorded", "policy", k.policy, "revision", r.Revision, "err", err)
	}
}

// collectorTLS presents the proxy's SVID to writd's gRPC port and accepts
// only writd's control-plane identity (authority.ControlPlaneID).
func collectorTLS(src *workloadapi.X509Source, td spiffeid.TrustDomain, clock clockwork.Clock) *tls.Config {
	return svidtls.ClientConfig(src, src, svidtls.AuthorizeID(spiffeid.RequireFromPath(td, "/writ/control-plane")), clock)
}
