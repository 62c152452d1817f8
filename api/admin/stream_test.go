package admin_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/api/admin"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/store/pgtest"
)

// TestStreamFlushesEachLine checks that a handler added with Handle can
// flush through the admin API's recorder: the handler writes its second
// line only after the client has read the first.
func TestStreamFlushesEachLine(t *testing.T) {
	pool := pgtest.NewMigrated(t)
	td := spiffeid.RequireTrustDomainFromString("example.org")
	srv := admin.New(admin.Options{Registry: authority.NewRegistry(pool, td, nil), Pool: pool})
	firstRead := make(chan struct{})
	srv.Handle("POST /v1/stream-test", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		fmt.Fprintln(w, `{"n": 1}`)
		if err := http.NewResponseController(w).Flush(); err != nil {
			fmt.Fprintf(w, "{\"flush\": %q}\n", err)
			return
		}
		select {
		case <-firstRead:
			fmt.Fprintln(w, `{"n": 2}`)
		case <-time.After(10 * time.Second): // a guard against a hang, not a timing assertion
			fmt.Fprintln(w, `{"n": "the first line never reached the client"}`)
		}
	}))
	srv.Handle("POST /v1/stream-refused", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		admin.WriteError(w, http.StatusBadRequest, "no such range")
	}))
	sock := filepath.Join(t.TempDir(), "admin", "admin.sock")
	l, err := admin.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done })

	c := admin.NewClient(sock)
	var lines []string
	err = c.Stream(context.Background(), http.MethodPost, "/v1/stream-test", map[string]int{}, func(b []byte) error {
		lines = append(lines, string(b))
		if len(lines) == 1 {
			close(firstRead)
		}
		return nil
	})
	if err != nil || len(lines) != 2 || lines[0] != `{"n": 1}` || lines[1] != `{"n": 2}` {
		t.Fatalf("stream: got %q, %v", lines, err)
	}
	err = c.Stream(context.Background(), http.MethodPost, "/v1/stream-refused", nil, func([]byte) error { return nil })
	var ae *admin.APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || ae.Msg != "no such range" {
		t.Errorf("refused stream: got %v", err)
	}
	// A call is recorded after its answer; poll (the limit guards a hang).
	var n int
	for deadline := time.Now().Add(10 * time.Second); n != 2 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM admin_events WHERE path LIKE '/v1/stream-%'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
	}
	if n != 2 {
		t.Errorf("recorded calls: got %d, want 2", n)
	}
}
