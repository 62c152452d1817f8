package proxy

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net/http"
	"sync"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"
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
	var ok bool
	switch {
	case hc.HTTPPath != "":
		ok = httpCheck(ctx, cl, e, hc)
	case hc.GRPC:
		ok = grpcCheck(ctx, cl, e, hc)
	default:
		if raw, err := cl.dialer.DialContext(ctx, "tcp", e.addr); err == nil {
			tc := tls.Client(raw, cl.tcpTLS)
			ok = tc.HandshakeContext(ctx) == nil
			raw.Close()
		}
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

// healthUserAgent marks checks in the peer's access log and policy input.
const healthUserAgent = "writ-health-check"

// maxHealthBody bounds what a check reads of an answer.
const maxHealthBody = 64 << 10

// httpCheck GETs the check's path from the endpoint over the cluster's
// HTTP/2 mTLS transport (its pooled connection to the peer, if any).
func httpCheck(ctx context.Context, cl *cluster, e *endpoint, hc *HealthCheck) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+e.addr+hc.HTTPPath, nil)
	if err != nil {
		return false
	}
	req.Host = cmp.Or(hc.HTTPHost, cl.cfg.Name)
	req.Header.Set("User-Agent", healthUserAgent)
	resp, err := cl.transport.RoundTrip(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxHealthBody))
	resp.Body.Close()
	if len(hc.ExpectedStatuses) == 0 {
		return resp.StatusCode == http.StatusOK
	}
	for _, r := range hc.ExpectedStatuses {
		if resp.StatusCode >= r.Start && resp.StatusCode < r.End {
			return true
		}
	}
	return false
}

// grpcCheck calls grpc.health.v1.Health/Check for the check's service over
// the cluster's HTTP/2 mTLS transport: healthy is an OK status whose
// answer says SERVING.
func grpcCheck(ctx context.Context, cl *cluster, e *endpoint, hc *HealthCheck) bool {
	msg, err := proto.Marshal(&healthpb.HealthCheckRequest{Service: hc.GRPCService})
	if err != nil {
		return false
	}
	frame := make([]byte, 5+len(msg))
	binary.BigEndian.PutUint32(frame[1:5], uint32(len(msg)))
	copy(frame[5:], msg)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+e.addr+"/grpc.health.v1.Health/Check", bytes.NewReader(frame))
	if err != nil {
		return false
	}
	req.Host = cl.cfg.Name
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	req.Header.Set("User-Agent", healthUserAgent)
	resp, err := cl.transport.RoundTrip(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHealthBody))
	if err != nil || resp.StatusCode != http.StatusOK {
		return false
	}
	status := resp.Trailer.Get("Grpc-Status")
	if status == "" {
		status = resp.Header.Get("Grpc-Status") // trailers-only answer
	}
	if status != "0" || len(body) < 5 || body[0] != 0 || int(binary.BigEndian.Uint32(body[1:5])) != len(body)-5 {
		return false
	}
	var out healthpb.HealthCheckResponse
	if proto.Unmarshal(body[5:], &out) != nil {
		return false
	}
	return out.GetStatus() == healthpb.HealthCheckResponse_SERVING
}
