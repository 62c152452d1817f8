package main

import (
	"context"
	"crypto/x509"

	"github.com/writmesh/writ/internal/run"
	"github.com/writmesh/writ/xds"
)

func init() { components = append(components, setupXDS) }

// setupXDS serves ADS and SDS on writd's TLS gRPC listener, keeps every
// connected data plane's snapshot current, and adds the mesh configuration
// routes to the admin API.
func setupXDS(ctx context.Context, d *deps) error {
	store := xds.NewStore(d.pool, nil)
	store.OnChange(meshChangeEvents(d.audit, d.auditSource))
	store.SetStale(d.cfg.Mesh.RegistryStale.D())
	srv := xds.NewServer(ctx, xds.ServerOptions{
		Store:       store,
		Pool:        d.pool,
		TrustDomain: d.td,
		Bundle: func(ctx context.Context) ([]*x509.Certificate, error) {
			b, err := d.ca.Bundle(ctx)
			if err != nil {
				return nil, err
			}
			return b.X509Authorities(), nil
		},
		Replica: d.cfg.ReplicaID,
		Grace:   d.cfg.Mesh.RegistryGrace.D(),
		Resync:  d.cfg.Mesh.Resync.D(),
		Log:     d.log.With("component", "xds"),
		Metrics: d.metrics,
	})
	srv.Register(d.grpc)
	(&meshAdmin{store: store, srv: srv}).register(d.adminMux)
	d.tasks = append(d.tasks, run.Task{Name: "xds", Run: srv.Run})
	return nil
}
