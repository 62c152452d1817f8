package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/api/decision"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/internal/run"
	"github.com/writmesh/writ/policy"
)

func init() { components = append(components, setupDecision) }

// setupDecision serves the authorization decision API on listen.decision,
// when set: TLS with the control-plane SVID, client certificates optional
// so that callers with a JWT-SVID bearer token can connect. The decision
// and admin policies reload from their directories on change.
// It runs after setupBundles (files register in name order) and serves the
// bundle service, if any, behind the admin policy.
func setupDecision(ctx context.Context, d *deps) error {
	addr := d.cfg.Listen.Decision
	if addr == "" {
		return nil
	}
	c := d.cfg.Decision
	log := d.log.With("component", "decision-api")
	eopts := decision.EngineOptions(c.PolicyDir, c.DecisionPath)
	eopts.Logger = log.With("policy", "decision")
	eopts.OnReload = policyReloadEvents(d.audit, d.auditSource, "decision-api:"+c.PolicyDir, log)
	engine, err := policy.NewEngine(ctx, eopts)
	if err != nil {
		return fmt.Errorf("decision api policy: %w", err)
	}
	aopts := decision.AdminEngineOptions(c.AdminPolicyDir)
	aopts.Logger = log.With("policy", "admin")
	aopts.OnReload = policyReloadEvents(d.audit, d.auditSource, "decision-api-admin:"+c.AdminPolicyDir, log)
	admin, err := policy.NewEngine(ctx, aopts)
	if err != nil {
		return fmt.Errorf("decision api admin policy: %w", err)
	}
	bundles := caBundles{ca: d.ca}
	api, err := decision.New(decision.Options{
		Engine: engine, Admin: admin,
		Sink:        &decision.AuditSink{Recorder: d.audit, Source: d.auditSource},
		X509Bundles: bundles, JWTBundles: bundles,
		Audience: c.JWTAudiences, BaseURL: c.BaseURL,
		MaxBodyBytes: c.MaxBodyBytes, MaxEvaluations: c.MaxEvaluations, EvalTimeout: c.EvalTimeout.D(),
		Metrics: d.metrics, Logger: log, Bundles: d.bundles,
	})
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen decision: %w", err)
	}
	srv := decision.HTTPServer(api)
	tl := tls.NewListener(l, d.ident.TLSConfig())
	log.Info("decision api serving", "addr", l.Addr().String(), "policy_revision", engine.Revision(), "admin_policy_revision", admin.Revision())
	d.tasks = append(d.tasks,
		run.Task{Name: "decision-policy", Run: engine.Run},
		run.Task{Name: "decision-admin-policy", Run: admin.Run},
		run.Task{Name: "decision-api", Run: func(ctx context.Context) error {
			errc := make(chan error, 1)
			go func() { errc <- srv.Serve(tl) }()
			select {
			case err := <-errc:
				if errors.Is(err, http.ErrServerClosed) {
					return nil
				}
				return err
			case <-ctx.Done():
			}
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			return srv.Shutdown(sctx)
		}},
	)
	return nil
}

// caBundles serves the CA's current trust bundle to the decision API's
// verifiers, so that root and JWT key rotations reach them at once.
type caBundles struct{ ca *authority.CA }

func (b caBundles) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	sb, err := b.ca.Bundle(context.Background())
	if err != nil {
		return nil, err
	}
	return sb.GetX509BundleForTrustDomain(td)
}

func (b caBundles) GetJWTBundleForTrustDomain(td spiffeid.TrustDomain) (*jwtbundle.Bundle, error) {
	sb, err := b.ca.Bundle(context.Background())
	if err != nil {
		return nil, err
	}
	return sb.GetJWTBundleForTrustDomain(td)
}
