package proxy

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"time"
)

// Envoy's outlier detection defaults.
const (
	defaultConsecutive   = 5
	defaultODInterval    = 10 * time.Second
	defaultBaseEjection  = 30 * time.Second
	defaultMaxEjection   = 300 * time.Second
	defaultMaxEjectedPct = 10
)

// tryStatus is what outlier detection counts for a try: the answer's
// status, or for a try that failed before one the status Envoy maps it
// to (504 for a timeout, 503 for a failed connection or a reset); 0 for
// a try that says nothing about the endpoint: refused by the circuit
// breaker, or abandoned by the client.
func tryStatus(resp *http.Response, err error, req *http.Request) int {
	switch {
	case err == nil:
		return resp.StatusCode
	case errors.Is(err, errOverflow):
		return 0
	case errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout
	case req.Context().Err() != nil:
		return 0
	}
	return http.StatusServiceUnavailable
}

// outcome feeds outlier detection with a try's status (see tryStatus;
// 0 is ignored). It costs a few atomic loads for a success.
func (c *cluster) outcome(e *endpoint, status int, now int64) {
	od := c.cfg.OutlierDetection
	if od == nil || status == 0 {
		return
	}
	if status < 500 {
		if e.fails.Load() != 0 {
			e.fails.Store(0)
		}
		if e.gwFails.Load() != 0 {
			e.gwFails.Store(0)
		}
		return
	}
	// As in Envoy each run has its own count; an error answer that is
	// not a gateway failure breaks the gateway run only.
	if status == http.StatusBadGateway || status == http.StatusServiceUnavailable || status == http.StatusGatewayTimeout {
		if int(e.gwFails.Add(1)) >= orDefault(od.ConsecutiveGatewayFailure, defaultConsecutive) {
			e.gwFails.Store(0)
			c.maybeEject(e, od, od.EnforcingConsecutiveGatewayFailure, now)
		}
	} else if e.gwFails.Load() != 0 {
		e.gwFails.Store(0)
	}
	if int(e.fails.Add(1)) >= orDefault(od.Consecutive5xx, defaultConsecutive) {
		e.fails.Store(0)
		enforce := 100
		if od.EnforcingConsecutive5xx != nil {
			enforce = *od.EnforcingConsecutive5xx
		}
		c.maybeEject(e, od, enforce, now)
	}
}

func orDefault(v, def int) int {
	if v <= 0 {
		return def
	}
	return v
}

// maybeEject ejects e at now if the detector is enforced this time
// (enforce percent), e is in the pool and the cap on ejected endpoints
// allows it. The ejection lasts base × backoff (capped), and ends at the
// first sweep after that: sweeps come every interval from odStart, and
// returning an endpoint is all a sweep does here (there is no
// success-rate detection), so the end is computed now rather than by a
// timer. The backoff first loses one for every sweep at which e had been
// back for an interval, as Envoy's sweeps take it down.
func (c *cluster) maybeEject(e *endpoint, od *OutlierDetection, enforce int, now int64) {
	if enforce <= 0 || enforce < 100 && rand.IntN(100) >= enforce {
		return
	}
	until := e.ejectedUntil.Load()
	if until != 0 && now < until {
		return // ejected already
	}
	out := 0
	for _, x := range c.eps {
		if !x.in(now) {
			out++
		}
	}
	pct := od.MaxEjectionPercent
	if pct == 0 {
		pct = defaultMaxEjectedPct
	}
	if max := max(1, len(c.eps)*pct/100); out >= max {
		return
	}
	interval := time.Duration(od.Interval)
	if interval <= 0 {
		interval = defaultODInterval
	}
	base := time.Duration(od.BaseEjectionTime)
	if base <= 0 {
		base = defaultBaseEjection
	}
	maxTime := time.Duration(od.MaxEjectionTime)
	if maxTime <= 0 {
		maxTime = max(defaultMaxEjection, base)
	}
	backoff := int64(e.backoff.Load())
	if until != 0 && backoff > 0 {
		// until was a sweep; those after it, up to now, each took one.
		backoff = max(0, backoff-(now-until)/int64(interval))
	}
	// Envoy stops growing the multiplier once it passes the cap.
	if backoff*int64(base) < int64(maxTime)+int64(base) {
		backoff++
	}
	d := min(time.Duration(backoff)*base, maxTime)
	sweeps := (now + int64(d) - c.odStart + int64(interval) - 1) / int64(interval)
	end := c.odStart + max(sweeps, 1)*int64(interval)
	if !e.ejectedUntil.CompareAndSwap(until, end) {
		return // another request ejected it meanwhile
	}
	e.backoff.Store(int32(backoff))
	c.ejected.Store(int64(out + 1))
	if c.onEject != nil {
		c.onEject()
	}
}
