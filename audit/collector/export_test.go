package collector

// SetRouted makes c COPY every batch into the parent table, for the
// benchmark comparing that with COPY into the day's partition.
func SetRouted(c *Collector, on bool) { c.routed = on }
