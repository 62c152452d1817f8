package collector_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/store/pgtest"
)

// BenchmarkInsertAB compares two ways of inserting on two databases of the
// same cluster, batch by batch in turns, so that both see the same load
// on a shared machine: COPY into the day's partition against COPY routed
// through the parent table, and the seven indexes against only the
// primary key, (source, seq) and the BRIN on time, and the cheaper
// index and storage choices docs/audit.md reports on (WAL compression,
// composite indexes without time, one GIN index for the four, text
// attributes, the C collation, indexes built after the inserts). It
// reports rows/s of each side.
// make bench-audit runs only 7-indexes-vs-3; one case at a time:
//
//	go test -run '^$' -bench InsertAB/btrees-vs-one-gin -benchtime 100000x ./audit/collector/
func BenchmarkInsertAB(b *testing.B) {
	secondary := map[string]string{"principal": "principal, time", "destination": "destination, time", "result": "result, time",
		"policy_rev": "policy_revision, time", "trace_id": "trace_id) WHERE (trace_id <> ''"}
	cases := []struct {
		name  string
		setup func(b *testing.B, a, z *collector.Collector, zpool func(string))
	}{
		{"partition-vs-routed", func(b *testing.B, a, z *collector.Collector, _ func(string)) { collector.SetRouted(z, true) }},
		{"without-trace-id-index", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			exec("DROP INDEX audit_events_trace_id")
		}},
		{"result-index-partial", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			exec("DROP INDEX audit_events_result")
			exec("CREATE INDEX audit_events_result ON audit_events (result, time) WHERE result <> 'allow'")
		}},
		{"without-principal-destination", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			exec("DROP INDEX audit_events_principal")
			exec("DROP INDEX audit_events_destination")
		}},
		{"wal-compression-lz4", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			// A superuser setting, per database here so that both sides
			// share one cluster; the pool reconnects to take it.
			exec("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET wal_compression = lz4', current_database()); END $$")
		}},
		{"indexes-without-time", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			// Partitions are days: within one, the time column of the
			// composite indexes orders little, and without it equal keys
			// deduplicate into posting lists.
			for _, c := range []string{"principal", "destination", "result", "policy_rev"} {
				exec("DROP INDEX audit_events_" + c)
			}
			for c, col := range map[string]string{"principal": "principal", "destination": "destination", "result": "result", "policy_rev": "policy_revision"} {
				exec("CREATE INDEX audit_events_" + c + " ON audit_events (" + col + ")")
			}
		}},
		{"btrees-vs-one-gin", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			// One multicolumn GIN index (btree_gin) serves equality on any
			// of its columns; its pending list takes inserts in bulk.
			for _, c := range []string{"principal", "destination", "result", "policy_rev"} {
				exec("DROP INDEX audit_events_" + c)
			}
			exec("CREATE EXTENSION IF NOT EXISTS btree_gin")
			exec("CREATE INDEX audit_events_who ON audit_events USING gin (principal, destination, result, policy_revision)")
		}},
		{"jsonb-vs-text-attributes", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			// What parsing the attributes into jsonb costs.
			exec("ALTER TABLE audit_events ALTER COLUMN attributes TYPE text")
		}},
		{"icu-en-US-vs-C-collation", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			// A cluster initialized in en_US (most are) compares index
			// keys by locale rules; the indexed columns declared COLLATE
			// "C" compare bytes. A gets the locale, B "C".
			for _, c := range []string{"source", "principal", "destination", "result", "policy_revision", "trace_id"} {
				execA(b, a, "ALTER TABLE audit_events ALTER COLUMN "+c+` TYPE text COLLATE "en-US-x-icu"`)
				exec("ALTER TABLE audit_events ALTER COLUMN " + c + ` TYPE text COLLATE "C"`)
			}
		}},
		{"7-indexes-vs-deferred-build", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			// The secondary indexes built once the rows are in (as a
			// closed day's partition could be), the build counted in B.
			for ix := range secondary {
				exec("DROP INDEX audit_events_" + ix)
			}
		}},
		{"7-indexes-vs-3", func(b *testing.B, a, z *collector.Collector, exec func(string)) {
			for _, ix := range []string{"audit_events_principal", "audit_events_destination", "audit_events_result", "audit_events_policy_rev", "audit_events_trace_id"} {
				exec("DROP INDEX " + ix)
			}
		}},
	}
	// finish, for a case, runs on B after the inserts, timed as B's.
	finish := map[string]func(exec func(string)){
		"7-indexes-vs-deferred-build": func(exec func(string)) {
			for ix, cols := range secondary {
				exec("CREATE INDEX audit_events_" + ix + " ON audit_events (" + cols + ")")
			}
		},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			pa, pz := pgtest.NewMigrated(b), pgtest.NewMigrated(b)
			a, err := collector.New(collector.Options{Pool: pa})
			if err != nil {
				b.Fatal(err)
			}
			z, err := collector.New(collector.Options{Pool: pz})
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			c.setup(b, a, z, func(sql string) {
				if _, err := pz.Exec(ctx, sql); err != nil {
					b.Fatal(err)
				}
			})
			pz.Reset() // sessions see what the setup changed
			evs := benchEvents(b.N)
			var ta, tz time.Duration
			b.ResetTimer()
			for i := 0; i < len(evs); i += 5000 {
				batch := evs[i:min(i+5000, len(evs))]
				for k, col := range []*collector.Collector{a, z} {
					if (i/5000)%2 == 1 { // alternate who goes first
						col = []*collector.Collector{z, a}[k]
					}
					start := time.Now()
					if err := col.Insert(ctx, batch); err != nil {
						b.Fatal(err)
					}
					if col == a {
						ta += time.Since(start)
					} else {
						tz += time.Since(start)
					}
				}
			}
			if f := finish[c.name]; f != nil {
				start := time.Now()
				f(func(sql string) {
					if _, err := pz.Exec(ctx, sql); err != nil {
						b.Fatal(err)
					}
				})
				tz += time.Since(start)
			}
			b.StopTimer()
			b.ReportMetric(float64(len(evs))/ta.Seconds(), "A-rows/s")
			b.ReportMetric(float64(len(evs))/tz.Seconds(), "B-rows/s")
		})
	}
}

// execA runs sql on A's database.
func execA(b *testing.B, a *collector.Collector, sql string) {
	if _, err := collector.PoolOf(a).Exec(context.Background(), sql); err != nil {
		b.Fatal(err)
	}
}

// benchEvents are n chained request events with the attributes a decision
// point records.
func benchEvents(n int) []audit.Event {
	evs := make([]audit.Event, n)
	var prev audit.Hash
	for i := range evs {
		ev, _ := audit.NewEvent(audit.KindRequest, time.Now())
		ev.Source, ev.Seq, ev.PrevHash = "spiffe://example.org/node/bench", uint64(i+1), prev
		ev.Principal, ev.Destination, ev.Action, ev.Result, ev.Status = "spiffe://example.org/ns/a/sa/frontend", "spiffe://example.org/ns/b/sa/orders", "GET", "allow", 200
		ev.Resource = fmt.Sprintf("/api/v1/items/%d", i)
		ev.PolicyRevision = "sha256:3f5c1b0e9d7a"
		ev.TraceID = fmt.Sprintf("4bf92f3577b34da6a3ce929d%08x", i)
		ev.Attributes, _ = audit.CanonicalJSON([]byte(fmt.Sprintf(`{"headers":{"content-type":"application/json","traceparent":"00-4bf92f3577b34da6a3ce929d%08x-00f067aa0ba902b7-01",`+
			`"user-agent":"Go-http-client/2.0","x-request-id":"%s"},"host":"orders.shop.svc","latency_us":12,"protocol":"HTTP/2","raw_path":"/api/v1/items/%d?page=2"}`, i, ev.ID, i)))
		ev.Seal()
		prev = ev.Hash
		evs[i] = ev
	}
	return evs
}
