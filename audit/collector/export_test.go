package collector

import "github.com/jackc/pgx/v5/pgxpool"

// SetRouted makes c COPY every batch into the parent table, for the
// benchmark comparing that with COPY into the day's partition.
func SetRouted(c *Collector, on bool) { c.routed = on }

// PoolOf is c's pool, for benchmarks that change one side's schema.
func PoolOf(c *Collector) *pgxpool.Pool { return c.o.Pool }
