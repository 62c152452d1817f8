package test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// bodyPolicy decides on the request body, as opa-envoy-plugin policies
// do: frontend may send orders a JSON or form body whose action is read,
// and a body cut short only when it says it expects that.
const bodyPolicy = `package envoy.authz

default allow := false

allow if {
	input.writ.source.service_account == "frontend"
	input.parsed_body.action == "read"
}

allow if {
	input.writ.source.service_account == "frontend"
	input.parsed_body.action == ["read"]
}

allow if {
	input.writ.source.service_account == "frontend"
	input.truncated_body
	input.attributes.request.http.headers["x-allow-truncated"] == "yes"
}
`

// TestWritProxyRequestBodyOverADS: real processes (writd on PostgreSQL,
// two writ-proxies configured over ADS). An AuthorizationPolicy with
// requestBody makes the orders sidecar hand request bodies to its Rego
// policy: a body's content allows or denies, a body over maxBytes is
// answered 413, and once the policy allows partial messages a large body
// is checked by its first bytes and still reaches the app whole, with
// Content-Length or chunked.
func TestWritProxyRequestBodyOverADS(t *testing.T) {
	pg := startPG(t)
	w := newAuditWritd(t, pg.url)
	exe := filepath.Join(binDir(t), "writ-proxy")
	w.registerSidecars(t, exe, map[string]string{"orders-v1": "orders", "frontend": "frontend"})
	meshDir := t.TempDir()
	apply := func(yaml string) {
		t.Helper()
		f := filepath.Join(meshDir, "mesh.yaml")
		write(t, f, yaml)
		if out, code := w.writ(t, "apply", "-f", f); code != 0 {
			t.Fatalf("apply: %s", out)
		}
	}
	// adsMesh (orders, frontend, an enforced AuthorizationPolicy last)
	// with the policy's requestBody.
	mesh := func(requestBody string) string { return adsMesh + "  requestBody: " + requestBody + "\n" }
	apply(mesh("{maxBytes: 1024}"))

	policyDir := t.TempDir()
	write(t, filepath.Join(policyDir, "body.rego"), bodyPolicy)
	// The app answers with the length and digest of the body it got.
	app := serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		sum := sha256.Sum256(b)
		fmt.Fprintf(w, "%d %s", len(b), hex.EncodeToString(sum[:]))
	}))
	// The enforcer parses at most 512 bytes (writ-enforcer's flag of the
	// same name): a whole body beyond that is truncated for policy.
	orders := startADSProxy(t, w, "orders-v1", "--inbound", freeAddr(t), "--app", app, "--version", "v1", "--policy-dir", policyDir, "--max-body-bytes", "512")
	up := freeAddr(t)
	startADSProxy(t, w, "frontend", "--upstream", "orders="+up)

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	post := func(ct string, body []byte, chunked bool, hdr ...string) (int, string) {
		var r io.Reader = bytes.NewReader(body)
		if chunked {
			r = io.MultiReader(r) // hides the length: sent chunked
		}
		req, _ := http.NewRequest("POST", "http://"+up+"/orders", r)
		req.Header.Set("Content-Type", ct)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	digest := func(b []byte) string {
		sum := sha256.Sum256(b)
		return fmt.Sprintf("%d %s", len(b), hex.EncodeToString(sum[:]))
	}
	read := []byte(`{"action": "read"}`)
	waitUntil(t, 30*time.Second, "frontend reaches orders with a body its policy allows", func() bool {
		code, _ := post("application/json", read, false)
		return code == 200
	})
	large := []byte(`{"action": "read", "pad": "` + strings.Repeat("x", 100<<10) + `"}`)
	mid := []byte(`{"action": "read", "pad": "` + strings.Repeat("m", 700) + `"}`)
	for _, chunked := range []bool{false, true} {
		tests := []struct {
			name, ct string
			body     []byte
			hdr      []string
			want     int
		}{
			{"json read", "application/json", read, nil, 200},
			{"json delete", "application/json", []byte(`{"action": "delete"}`), nil, 403},
			{"form read", "application/x-www-form-urlencoded", []byte("action=read"), nil, 200},
			{"form delete", "application/x-www-form-urlencoded", []byte("action=delete"), nil, 403},
			{"malformed json", "application/json", []byte(`{"action": `), nil, 403},
			{"held whole, beyond the parse limit", "application/json", mid, nil, 403},
			{"held whole, beyond the parse limit, truncation expected", "application/json", mid, []string{"x-allow-truncated", "yes"}, 200},
			{"over maxBytes", "application/json", large, []string{"x-allow-truncated", "yes"}, 413},
		}
		for _, tt := range tests {
			code, got := post(tt.ct, tt.body, chunked, tt.hdr...)
			if code != tt.want || code == 200 && got != digest(tt.body) {
				t.Errorf("chunked=%v %s: %d %q, want %d (and the app to get %s)", chunked, tt.name, code, got, tt.want, digest(tt.body))
			}
		}
	}

	// Partial messages allowed: the first 1,024 bytes are checked, marked
	// truncated, and the app gets the whole body.
	apply(mesh("{maxBytes: 1024, allowPartialMessage: true}"))
	waitUntil(t, 30*time.Second, "orders takes allowPartialMessage", func() bool {
		code, _ := post("application/json", large, false, "x-allow-truncated", "yes")
		return code == 200
	})
	for _, chunked := range []bool{false, true} {
		if code, got := post("application/json", large, chunked, "x-allow-truncated", "yes"); code != 200 || got != digest(large) {
			t.Errorf("chunked=%v: truncated and allowed: %d %q, want 200 %s", chunked, code, got, digest(large))
		}
		if code, _ := post("application/json", large, chunked); code != 403 {
			t.Errorf("chunked=%v: truncated, not allowed: %d, want 403", chunked, code)
		}
	}
	if t.Failed() {
		t.Logf("orders config_dump: %+v", orders.dump(t).XDS)
	}
}
