package proxy

import (
	"context"
	"errors"
	"math"
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

	defaultSRMinHosts    = 5
	defaultSRVolume      = 100
	defaultSRStdevFactor = 1900 // thousandths
	defaultFPThreshold   = 85
	defaultFPMinHosts    = 5
	defaultFPVolume      = 50
)

// Detector names, the detector label of writ_upstream_ejections_total;
// Envoy's names for its ejection types.
const (
	detector5xx       = "consecutive_5xx"
	detectorGateway   = "consecutive_gateway_failure"
	detectorSR        = "success_rate"
	detectorFP        = "failure_percentage"
	countOne          = 1 << 32 // a try in endpoint.window
	countFailure      = 1       // a failed try in endpoint.window
	countFailuresMask = 1<<32 - 1
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
	if c.nextSweep.Load() != 0 {
		// The try belongs to the interval it ended in: close the one
		// before first.
		c.sweep(now)
		if status < 500 {
			e.window.Add(countOne)
		} else {
			e.window.Add(countOne | countFailure)
		}
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
			c.maybeEject(e, od, od.EnforcingConsecutiveGatewayFailure, now, detectorGateway)
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
		c.maybeEject(e, od, enforce, now, detector5xx)
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
// an ejected endpoint's return is computed now rather than by a timer
// (see sweep for the detectors that run at sweeps). The backoff first loses one for every sweep at which e had been
// back for an interval, as Envoy's sweeps take it down.
func (c *cluster) maybeEject(e *endpoint, od *OutlierDetection, enforce int, now int64, detector string) {
	if enforce <= 0 || enforce < 100 && c.randN(100) >= enforce {
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
		c.onEject(detector)
	}
}

func (c *cluster) randN(n int) int {
	if c.rand != nil {
		return c.rand(n)
	}
	return rand.IntN(n)
}

// sweepsOn reports whether od enforces a detector that runs at sweeps
// (success rate, failure percentage): only then are tries counted per
// interval.
func sweepsOn(od *OutlierDetection) bool {
	return od != nil && (od.EnforcingSuccessRate == nil || *od.EnforcingSuccessRate > 0 || od.EnforcingFailurePercentage > 0)
}

// sweep runs the interval detectors once now has reached the next sweep.
// There is no timer: the first try (picked or ended) at or after a sweep
// time runs it for that time, before it is routed or counted, so the
// pool it sees is the one a timer would have left. An interval without
// tries has nothing to judge. One caller wins the sweep; the others go
// on at once.
func (c *cluster) sweep(now int64) {
	next := c.nextSweep.Load()
	if next == 0 || now < next {
		return
	}
	interval := c.odInterval()
	after := next + ((now-next)/interval+1)*interval
	if !c.nextSweep.CompareAndSwap(next, after) {
		return
	}
	c.evaluate(next)
}

func (c *cluster) odInterval() int64 {
	if d := int64(c.cfg.OutlierDetection.Interval); d > 0 {
		return d
	}
	return int64(defaultODInterval)
}

// evaluate closes the interval ending at (a sweep time): it takes every
// endpoint's tries of the interval and runs Envoy's success-rate and then
// failure-percentage detectors on them. Endpoints ejected at this time
// are left out, as their few tries say little. It allocates nothing:
// the interval's counts wait in each endpoint for the second pass.
func (c *cluster) evaluate(at int64) {
	od := c.cfg.OutlierDetection
	c.evalMu.Lock()
	defer c.evalMu.Unlock()
	srVolume := uint64(orDefault(od.SuccessRateRequestVolume, defaultSRVolume))
	fpVolume := uint64(orDefault(od.FailurePercentageRequestVolume, defaultFPVolume))
	var srHosts, fpHosts int
	var sum, sumSq float64
	for _, e := range c.eps {
		w := e.window.Swap(0)
		e.last = w
		if u := e.ejectedUntil.Load(); u != 0 && at < u {
			e.last = 0
			continue
		}
		total := w >> 32
		if total >= srVolume {
			rate := 100 * float64(total-w&countFailuresMask) / float64(total)
			srHosts++
			sum += rate
			sumSq += rate * rate
		}
		if total >= fpVolume {
			fpHosts++
		}
	}
	enforceSR := 100
	if od.EnforcingSuccessRate != nil {
		enforceSR = *od.EnforcingSuccessRate
	}
	if enforceSR > 0 && srHosts > 0 && srHosts >= orDefault(od.SuccessRateMinimumHosts, defaultSRMinHosts) {
		mean := sum / float64(srHosts)
		// Population variance, as Envoy computes it.
		variance := max(0, sumSq/float64(srHosts)-mean*mean)
		threshold := mean - math.Sqrt(variance)*float64(orDefault(od.SuccessRateStdevFactor, defaultSRStdevFactor))/1000
		for _, e := range c.eps {
			if total := e.last >> 32; total >= srVolume && 100*float64(total-e.last&countFailuresMask)/float64(total) < threshold {
				c.maybeEject(e, od, enforceSR, at, detectorSR)
			}
		}
	}
	if od.EnforcingFailurePercentage > 0 && fpHosts > 0 && fpHosts >= orDefault(od.FailurePercentageMinimumHosts, defaultFPMinHosts) {
		threshold := float64(defaultFPThreshold)
		if od.FailurePercentageThreshold != nil {
			threshold = float64(*od.FailurePercentageThreshold)
		}
		for _, e := range c.eps {
			if total := e.last >> 32; total >= fpVolume && 100*float64(e.last&countFailuresMask)/float64(total) >= threshold {
				c.maybeEject(e, od, od.EnforcingFailurePercentage, at, detectorFP)
			}
		}
	}
}
