package enforcer

import (
	"context"
	"testing"
	"time"

	"github.com/writmesh/writ/audit"
)

// BenchmarkAuditSinkRecord is the cost auditing adds to a decision in the
// default durability mode: building the event (attributes with the
// default header allowlist), sealing it into the chain and one write(2).
//
//	go test -run '^$' -bench AuditSinkRecord -benchmem ./enforcer/
func BenchmarkAuditSinkRecord(b *testing.B) {
	sp, err := audit.OpenSpool(audit.SpoolOptions{Dir: b.TempDir(), Source: "spiffe://example.org/ns/a/sa/enforcer", MaxBytes: 8 << 30})
	if err != nil {
		b.Fatal(err)
	}
	defer sp.Close()
	red, _ := audit.NewRedaction(audit.DefaultAllowedHeaders)
	s := &AuditSink{Spool: sp, Redaction: red}
	d := Decision{ID: "0193a4b2-7c1d-7e2f-8a3b-4c5d6e7f8091", Time: time.Now(), Source: "spiffe://example.org/ns/shop/sa/frontend",
		Destination: "spiffe://example.org/ns/shop/sa/orders", Method: "GET", Path: "/api/v1/items/42", RawPath: "/api/v1/items/42?page=2",
		Protocol: "HTTP/2", Result: ResultAllow, HTTPStatus: 200, Reason: "policy allowed", Cause: CausePolicy, PolicyRevision: "sha256:3f5c",
		Latency: 12 * time.Microsecond, Host: "orders.shop", Headers: map[string]string{":method": "GET", ":path": "/api/v1/items/42?page=2",
			"user-agent": "Go-http-client/2.0", "x-request-id": "8f14e45f-ceea-467f-a8f6-1b2c3d4e5f60", "authorization": "Bearer x", "accept": "*/*"}}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d.ID = ""
		if err := s.Record(ctx, d); err != nil {
			b.Fatal(err)
		}
	}
}
