package proxy

import (
	"context"
	"crypto/tls"
	"sync"
	"time"
)

// healthCheck probes the endpoints of every cluster that asks for it,
// each on its own interval, until ctx ends. It runs in Run.
func (p *Proxy) healthCheck(ctx context.Context) {
	tick := p.clock.NewTicker(time.Second)
	defer tick.Stop()
	last := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.Chan():
		}
		now := p.clock.Now()
		var wg sync.WaitGroup
		for name, cl := range p.state.Load().clusters {
			hc := cl.cfg.HealthCheck
			if hc == nil || now.Sub(last[name]) < time.Duration(hc.Interval) {
				continue
			}
			last[name] = now
			for _, e := range cl.eps {
				wg.Go(func() { p.probe(ctx, cl, e, hc) })
			}
		}
		wg.Wait()
	}
}

// probe checks one endpoint and moves it in or out of the pool.
func (p *Proxy) probe(ctx context.Context, cl *cluster, e *endpoint, hc *HealthCheck) {
	timeout := time.Duration(hc.Timeout)
	if timeout <= 0 {
		timeout = time.Second
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ok := false
	if raw, err := cl.dialer.DialContext(ctx, "tcp", e.addr); err == nil {
		tc := tls.Client(raw, cl.tcpTLS)
		ok = tc.HandshakeContext(ctx) == nil
		raw.Close()
	}
	if !ok && parent.Err() != nil {
		return // shutting down: no verdict
	}
	down, up := max(1, hc.UnhealthyThreshold), max(1, hc.HealthyThreshold)
	if ok {
		e.hcFail, e.hcPass = 0, e.hcPass+1
		if e.unhealthy.Load() && e.hcPass >= up {
			e.unhealthy.Store(false)
			p.metrics.healthChanges.WithLabelValues(cl.cfg.Name, "healthy").Inc()
		}
		return
	}
	e.hcPass, e.hcFail = 0, e.hcFail+1
	if !e.unhealthy.Load() && e.hcFail >= down {
		e.unhealthy.Store(true)
		cl.ejected.Store(1) // pick filters the pool from now on
		p.metrics.healthChanges.WithLabelValues(cl.cfg.Name, "unhealthy").Inc()
	}
}
