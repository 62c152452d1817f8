package proxy

import (
	"bytes"
	"encoding/json"
	"io"
	"testing"
	"time"
)

// TestAccessLogBuffer: an access log to a writer holds lines until
// flushed, then writes them as JSON; one to io.Discard (the log off)
// keeps no buffer, and writing and flushing it are no-ops.
func TestAccessLogBuffer(t *testing.T) {
	now := time.Date(2026, 12, 6, 1, 2, 3, 0, time.UTC)
	r := &reqLog{direction: "inbound", method: "GET", path: "/x", proto: "HTTP/1.1", dest: "orders", authz: "allow", status: 200}

	var buf bytes.Buffer
	on := newAccessLog(&buf)
	on.write(r, now)
	if buf.Len() != 0 {
		t.Fatalf("line written before flush: %q", buf.String())
	}
	on.flush()
	var got map[string]any
	if err := json.Unmarshal(buf.Bytes(), &got); err != nil || got["path"] != "/x" || got["direction"] != "inbound" {
		t.Fatalf("flushed %q (%v), want one JSON line for /x", buf.String(), err)
	}

	off := newAccessLog(io.Discard)
	if off.out != nil {
		t.Errorf("access log off holds a %d-byte buffer", off.out.Size())
	}
	off.write(r, now)
	off.flush()
}
