package admin_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/api/admin"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/store/pgtest"
)

func startAdmin(t *testing.T, allowed ...uint32) (*admin.Client, *pgxpool.Pool, string) {
	t.Helper()
	return startAdminAt(t, filepath.Join(t.TempDir(), "admin", "admin.sock"), allowed...)
}

func startAdminAt(t *testing.T, sock string, allowed ...uint32) (*admin.Client, *pgxpool.Pool, string) {
	t.Helper()
	pool := pgtest.NewMigrated(t)
	td := spiffeid.RequireTrustDomainFromString("example.org")
	srv := admin.New(admin.Options{Registry: authority.NewRegistry(pool, td, nil), Pool: pool, AllowedUIDs: allowed})
	l, err := admin.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return admin.NewClient(sock), pool, sock
}

func TestAdminEntriesAndTokensAreRecordedWithUID(t *testing.T) {
	c, pool, _ := startAdmin(t)
	ctx := context.Background()
	var tok admin.Token
	if err := c.Do(ctx, http.MethodPost, "/v1/join-tokens", admin.CreateTokenRequest{SPIFFEID: "spiffe://example.org/node/n1", TTL: "5m"}, &tok); err != nil {
		t.Fatal(err)
	}
	if tok.Token == "" || tok.SPIFFEID != "spiffe://example.org/node/n1" {
		t.Fatalf("token = %+v", tok)
	}
	var e admin.Entry
	if err := c.Do(ctx, http.MethodPost, "/v1/entries", admin.EntryRequest{SPIFFEID: "spiffe://example.org/ns/default/sa/web", ParentID: "spiffe://example.org/node/n1", Selectors: []string{"unix:uid:1000"}}, &e); err != nil {
		t.Fatal(err)
	}
	var list admin.EntryList
	if err := c.Do(ctx, http.MethodGet, "/v1/entries", nil, &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Entries) != 1 || list.Entries[0].ID != e.ID || list.Entries[0].CreatedBy != "uid:"+itoa(os.Geteuid()) {
		t.Fatalf("entries = %+v", list)
	}
	if err := c.Do(ctx, http.MethodDelete, "/v1/entries/"+e.ID, nil, nil); err != nil {
		t.Fatal(err)
	}
	var apiErr *admin.APIError
	if err := c.Do(ctx, http.MethodDelete, "/v1/entries/"+e.ID, nil, nil); !errors.As(err, &apiErr) || apiErr.Status != http.StatusNotFound {
		t.Fatalf("second delete = %v, want 404", err)
	}
	// Every call is an admin event with the caller's uid; the token is in none.
	rows, err := pool.Query(ctx, `SELECT actor, method, path, status, coalesce(detail::text, '') FROM admin_events ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var got []string
	for rows.Next() {
		var actor, method, path, detail string
		var status int
		if err := rows.Scan(&actor, &method, &path, &status, &detail); err != nil {
			t.Fatal(err)
		}
		if actor != "uid:"+itoa(os.Geteuid()) {
			t.Errorf("actor = %s", actor)
		}
		if strings.Contains(detail, tok.Token) {
			t.Errorf("admin event leaks the join token: %s", detail)
		}
		got = append(got, method+" "+path+" "+itoa(status))
	}
	want := []string{"POST /v1/join-tokens 201", "POST /v1/entries 201", "GET /v1/entries 200", "DELETE /v1/entries/" + e.ID + " 204", "DELETE /v1/entries/" + e.ID + " 404"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("admin events:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestAdminBadInputChangesNothing(t *testing.T) {
	c, pool, _ := startAdmin(t)
	ctx := context.Background()
	var apiErr *admin.APIError
	err := c.Do(ctx, http.MethodPost, "/v1/entries", admin.EntryRequest{SPIFFEID: "spiffe://evil.org/x", ParentID: "spiffe://example.org/node/n1", Selectors: []string{"unix:uid:1"}}, nil)
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusBadRequest || !strings.Contains(apiErr.Msg, "outside trust domain") {
		t.Fatalf("err = %v", err)
	}
	err = c.Do(ctx, http.MethodPost, "/v1/join-tokens", map[string]any{"spiffe_id": "spiffe://example.org/node/n1", "bogus": 1}, nil)
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusBadRequest || !strings.Contains(apiErr.Msg, "unknown field") {
		t.Fatalf("unknown field err = %v", err)
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM registration_entries) + (SELECT count(*) FROM join_tokens)`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("bad input changed state: %d rows", n)
	}
}

func TestAdminRefusesOtherUIDs(t *testing.T) {
	if os.Geteuid() != 0 {
		needRoot(t)
	}
	_, _, sock := startAdminAt(t, filepath.Join(openBase(t), "admin", "admin.sock"))
	// The socket's directory is closed to everyone else.
	fi, err := os.Stat(filepath.Dir(sock))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("socket dir mode = %v, want 0700", fi.Mode().Perm())
	}
	out, err := runAs(65534, sock)
	if err == nil {
		t.Fatalf("uid 65534 reached the admin API: %s", out)
	}
	if !strings.Contains(out, "permission denied") {
		t.Fatalf("uid 65534 failed for another reason: %s", out)
	}
}

func TestListenRefusesOpenDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Listen(filepath.Join(dir, "admin.sock")); err == nil || !strings.Contains(err.Error(), "0700") {
		t.Fatalf("Listen in a world-writable dir = %v, want refusal", err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestMain doubles as the helper process that dials the admin socket as
// another uid.
func TestMain(m *testing.M) {
	if sock := os.Getenv("WRIT_ADMIN_TEST_DIAL"); sock != "" {
		var w admin.WhoAmI
		err := admin.NewClient(sock).Do(context.Background(), http.MethodGet, "/v1/whoami", nil, &w)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Printf("whoami: uid %d\n", w.UID)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runAs runs this test binary as uid to call whoami on the socket.
func runAs(uid uint32, sock string) (string, error) {
	// The test binary sits in a private build directory; the other uid
	// needs a copy it may execute.
	bin := filepath.Join(filepath.Dir(filepath.Dir(sock)), "helper.test")
	if _, err := os.Stat(bin); err != nil {
		data, err := os.ReadFile(os.Args[0])
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(bin, data, 0o755); err != nil {
			return "", err
		}
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), "WRIT_ADMIN_TEST_DIAL="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// openBase makes a directory every user can traverse, so that only the
// admin directory's own permissions stand between another uid and the
// socket.
func openBase(t *testing.T) string {
	t.Helper()
	base, err := os.MkdirTemp("", "writ-admin-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	return base
}

// Even with the file permissions opened up, the uid check refuses.
func TestAdminUIDCheckBehindOpenedSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		needRoot(t)
	}
	_, _, sock := startAdminAt(t, filepath.Join(openBase(t), "admin", "admin.sock"))
	if err := os.Chmod(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	out, err := runAs(65534, sock)
	if err == nil || !strings.Contains(out, "uid 65534 may not use the admin API") {
		t.Fatalf("uid 65534 through an opened socket: err=%v out=%s", err, out)
	}
	// And an allowed uid gets in.
	_, _, sock2 := startAdminAt(t, filepath.Join(openBase(t), "admin", "admin.sock"), 65534)
	_ = os.Chmod(filepath.Dir(sock2), 0o755)
	_ = os.Chmod(sock2, 0o666)
	out, err = runAs(65534, sock2)
	if err != nil || !strings.Contains(out, "whoami: uid 65534") {
		t.Fatalf("allowed uid 65534: err=%v out=%s", err, out)
	}
}

// needRoot stops a test that must run as root to act as another uid: a
// failure under CI (which runs as root), a skip elsewhere.
func needRoot(t *testing.T) {
	t.Helper()
	const msg = "needs root to connect as another uid"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}
