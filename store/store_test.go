package store_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/writmesh/writ/store"
	"github.com/writmesh/writ/store/pgtest"
)

func TestMigrationsAreOrderedAndUnique(t *testing.T) {
	migs, err := store.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if len(migs) == 0 {
		t.Fatal("no embedded migrations")
	}
	for i := 1; i < len(migs); i++ {
		if migs[i].Version <= migs[i-1].Version {
			t.Errorf("migration %s not after %s", migs[i].Name, migs[i-1].Name)
		}
	}
}

// Replicas start together: every one must succeed and each step must be
// applied once.
func TestMigrateConcurrentReplicas(t *testing.T) {
	url := pgtest.URL(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const replicas = 5
	var wg sync.WaitGroup
	errs := make(chan error, replicas)
	for range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pool, err := store.Open(ctx, url)
			if err != nil {
				errs <- err
				return
			}
			defer pool.Close()
			errs <- store.Migrate(ctx, pool, nil)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("replica migrate: %v", err)
		}
	}
	pool, err := store.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	migs, _ := store.Migrations()
	var n int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM schema_migrations").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if got, want := n, len(migs); got != want {
		t.Fatalf("schema_migrations rows = %d, want %d", got, want)
	}
	// Running again is a no-op.
	if err := store.Migrate(ctx, pool, nil); err != nil {
		t.Fatalf("second migrate: %v", err)
	}
}

func TestMigrateRefusesNewerSchema(t *testing.T) {
	pool := pgtest.NewMigrated(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES (99999, '99999_future.sql')"); err != nil {
		t.Fatal(err)
	}
	if err := store.Migrate(ctx, pool, nil); err == nil {
		t.Fatal("migrate against a newer schema succeeded, want an error")
	}
}

func TestOpenBadURLDoesNotLeakPassword(t *testing.T) {
	_, err := store.Open(context.Background(), "postgres://u:s3cret@%zz/db")
	if err == nil {
		t.Fatal("want error")
	}
	if got := err.Error(); strings.Contains(got, "s3cret") {
		t.Fatalf("error leaks password: %s", got)
	}
}
