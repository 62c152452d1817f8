package main

import (
	"context"
	"crypto/tls"
	"errors"
	"sync/atomic"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/authority/svidtls"
	"github.com/writmesh/writ/enforcer"
)

// spoolSink is the proxy's decision sink: the durable audit spool. The
// spool is named after the proxy's SVID, which arrives only after the
// enforcer is built, so the sink is filled in when Run has the SVID;
// until then it refuses, and a refusal denies (no request is served
// before then anyway). Safe for concurrent use.
type spoolSink struct {
	s atomic.Pointer[enforcer.AuditSink]
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
	r.sink.s.Store(&enforcer.AuditSink{Spool: rec.Spool, Redaction: rec.Redaction})
	return rec, nil
}

// collectorTLS presents the proxy's SVID to writd's gRPC port and accepts
// only writd's control-plane identity (authority.ControlPlaneID).
func collectorTLS(src *workloadapi.X509Source, td spiffeid.TrustDomain, clock clockwork.Clock) *tls.Config {
	return svidtls.ClientConfig(src, src, svidtls.AuthorizeID(spiffeid.RequireFromPath(td, "/writ/control-plane")), clock)
}
