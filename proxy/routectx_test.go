package proxy

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestRouteCtx: routeCtx behaves as context.WithDeadline does (its
// target, its deadline, Canceled once ended, DeadlineExceeded once past,
// children cancelled with it) whether or not Done was ever asked for,
// and reports onlyDeadline only until it was.
func TestRouteCtx(t *testing.T) {
	newCtx := func(d time.Time) *routeCtx {
		return &routeCtx{targetCtx: targetCtx{Context: context.Background(), t: target{source: "s"}}, deadline: d}
	}
	later := time.Now().Add(time.Hour)
	target := func(ctx context.Context) string {
		tg, _ := ctx.Value(targetKey{}).(*target)
		if tg == nil {
			return ""
		}
		return tg.source
	}

	c := newCtx(later)
	if d, ok := c.onlyDeadline(); !ok || !d.Equal(later) {
		t.Fatalf("onlyDeadline before Done: %v %v", d, ok)
	}
	if c.Err() != nil || target(c) != "s" {
		t.Fatalf("fresh: %v, target %q", c.Err(), target(c))
	}
	c.end()
	if !errors.Is(c.Err(), context.Canceled) {
		t.Fatalf("ended without Done: %v", c.Err())
	}
	select {
	case <-c.Done():
	default:
		t.Fatal("Done asked for after the end is not closed")
	}

	c = newCtx(later)
	child, cancel := context.WithCancel(c) // asks for Done
	defer cancel()
	if _, ok := c.onlyDeadline(); ok {
		t.Fatal("onlyDeadline after Done was asked for")
	}
	if target(child) != "s" || target(c) != "s" {
		t.Fatal("the target is lost once Done was asked for")
	}
	c.end()
	<-child.Done()
	if !errors.Is(c.Err(), context.Canceled) {
		t.Fatalf("ended after Done: %v", c.Err())
	}

	past := newCtx(time.Now().Add(-time.Millisecond))
	if !errors.Is(past.Err(), context.DeadlineExceeded) {
		t.Fatalf("past its deadline: %v", past.Err())
	}
	<-past.Done()
	if !errors.Is(past.Err(), context.DeadlineExceeded) {
		t.Fatalf("past its deadline, after Done: %v", past.Err())
	}
}
