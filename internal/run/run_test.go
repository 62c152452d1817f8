package run

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestGroupFirstErrorCancelsOthers(t *testing.T) {
	boom := errors.New("boom")
	stopped := make(chan struct{})
	err := Group(context.Background(), time.Second,
		Task{"waiter", func(ctx context.Context) error { <-ctx.Done(); close(stopped); return nil }},
		Task{"failer", func(ctx context.Context) error { return boom }},
	)
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "failer") {
		t.Fatalf("err = %v, want failer: boom", err)
	}
	select {
	case <-stopped:
	default:
		t.Fatal("waiter was not cancelled")
	}
}

func TestGroupPanicBecomesError(t *testing.T) {
	err := Group(context.Background(), time.Second, Task{"p", func(context.Context) error { panic("oops") }})
	if err == nil || !strings.Contains(err.Error(), "panic: oops") {
		t.Fatalf("err = %v", err)
	}
}

func TestGroupCleanStop(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Group(ctx, time.Second, Task{"w", func(ctx context.Context) error { <-ctx.Done(); return nil }}); err != nil {
		t.Fatalf("err = %v", err)
	}
}

func TestGroupShutdownTimeout(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	block := make(chan struct{})
	defer close(block)
	err := Group(ctx, 10*time.Millisecond, Task{"stuck", func(context.Context) error { <-block; return nil }})
	if !errors.Is(err, ErrShutdownTimeout) {
		t.Fatalf("err = %v", err)
	}
}
