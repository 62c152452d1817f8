package authority_test

import (
	"context"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/authoritytest"
	"github.com/writmesh/writ/authority/nodeapi"
)

// BenchmarkNodeSignX509SVIDs is CSR -> SVID end to end: an agent's
// SignX509SVIDs call over gRPC with mTLS to the node API, which checks the
// node against PostgreSQL, signs, and writes the issuance log before it
// answers. One op is one SVID; batch is how many CSRs one call carries.
func BenchmarkNodeSignX509SVIDs(b *testing.B) {
	for _, batch := range []int{1, 16} {
		b.Run(map[int]string{1: "batch=1", 16: "batch=16"}[batch], func(b *testing.B) {
			env := authoritytest.Start(b, authoritytest.Options{})
			ctx := context.Background()
			node := env.Attest(b, "bench")
			e, err := env.Registry.CreateEntry(ctx, authority.EntryInput{SPIFFEID: "spiffe://example.org/ns/bench/sa/web",
				ParentID: "spiffe://example.org/node/bench", Selectors: []string{"unix:uid:1"}}, "bench")
			if err != nil {
				b.Fatal(err)
			}
			c := env.Dial(b, node)
			// CSRs are made ahead: the agent's key generation is not the
			// server's cost.
			reqs := make([]*nodeapi.CSR, batch)
			for i := range reqs {
				_, der := authoritytest.CSR(b, spiffeid.ID{})
				reqs[i] = &nodeapi.CSR{EntryId: e.ID, Csr: der}
			}
			req := &nodeapi.SignX509SVIDsRequest{Csrs: reqs}
			if _, err := c.SignX509SVIDs(ctx, req); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			start := time.Now()
			for i := 0; i < b.N; i += batch {
				resp, err := c.SignX509SVIDs(ctx, req)
				if err != nil {
					b.Fatal(err)
				}
				if resp.GetResults()[0].GetError() != "" {
					b.Fatal(resp.GetResults()[0].GetError())
				}
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "svids/s")
		})
	}
}
