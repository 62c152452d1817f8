// Package run runs a process's long-lived parts as one group: the first
// to fail cancels the rest, a panic becomes an error, and shutdown waits a
// bounded time. Only cmd/* and tests import it.
package run

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"time"
)

// Task is a long-running part. It returns nil when ctx is cancelled and it
// has stopped cleanly.
type Task struct {
	Name string
	Run  func(ctx context.Context) error
}

// ErrShutdownTimeout reports tasks that did not stop in time.
var ErrShutdownTimeout = errors.New("shutdown timed out")

// Group runs tasks until ctx is cancelled or one of them returns. It then
// cancels the others and waits for them up to grace. It returns the first
// task error (wrapped with the task's name), or nil for a clean stop.
func Group(ctx context.Context, grace time.Duration, tasks ...Task) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		name string
		err  error
	}
	results := make(chan result, len(tasks))
	var wg sync.WaitGroup
	for _, t := range tasks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			func() {
				defer func() {
					if r := recover(); r != nil {
						err = fmt.Errorf("panic: %v\n%s", r, debug.Stack())
					}
				}()
				err = t.Run(ctx)
			}()
			results <- result{t.Name, err}
		}()
	}
	var first error
	select {
	case <-ctx.Done():
	case r := <-results:
		if r.err != nil {
			first = fmt.Errorf("%s: %w", r.name, r.err)
		} else if ctx.Err() == nil {
			first = fmt.Errorf("%s: stopped unexpectedly", r.name)
		}
	}
	cancel()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		return errors.Join(first, ErrShutdownTimeout)
	}
	close(results)
	for r := range results {
		if r.err != nil && first == nil {
			first = fmt.Errorf("%s: %w", r.name, r.err)
		}
	}
	return first
}
