package collector

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// NotifyChannel is the PostgreSQL channel on which every committed insert
// announces "SOURCE\tFIRST\tLAST" (a range of one chain's seqs), so that
// followers (Follow) can read exactly the new rows.
const NotifyChannel = "writ_audit"

// notify announces a committed range; inside tx, it is delivered on
// commit and never for a rolled-back insert.
func notify(ctx context.Context, tx pgx.Tx, source string, first, last uint64) error {
	if _, err := tx.Exec(ctx, "SELECT pg_notify($1, $2)", NotifyChannel,
		source+"\t"+strconv.FormatUint(first, 10)+"\t"+strconv.FormatUint(last, 10)); err != nil {
		return fmt.Errorf("notify: %w", err)
	}
	return nil
}

// Follow emits, until ctx ends or emit fails, every event committed from
// now on that matches f (its time range and pagination fields are
// ignored), in commit order per source. It opens one connection of its
// own (pool's configuration) for LISTEN and its reads. A range announced
// twice (a re-sent batch) is emitted once.
func Follow(ctx context.Context, pool *pgxpool.Pool, f Filter, emit func(Row) error) error {
	// A connection of its own, outside the pool: a follower holds it for
	// as long as it runs, and followers must not starve writd's pool.
	conn, err := pgx.ConnectConfig(ctx, pool.Config().ConnConfig.Copy())
	if err != nil {
		return fmt.Errorf("follow: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		conn.Close(cctx)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+NotifyChannel); err != nil {
		return fmt.Errorf("follow: %w", err)
	}
	f.Since, f.Until, f.After, f.Limit = zeroTime, zeroTime, "", 0
	emitted := map[string]uint64{}
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("follow: %w", err)
		}
		parts := strings.Split(n.Payload, "\t")
		if len(parts) != 3 {
			continue
		}
		first, err1 := strconv.ParseUint(parts[1], 10, 64)
		last, err2 := strconv.ParseUint(parts[2], 10, 64)
		if err1 != nil || err2 != nil || last < first {
			continue
		}
		src := parts[0]
		if done := emitted[src]; done >= first {
			first = done + 1
		}
		if first > last {
			continue
		}
		var args []any
		where := filterWhere(f, &args)
		args = append(args, src, int64(first), int64(last))
		where = append(where, fmt.Sprintf("source = $%d AND seq BETWEEN $%d AND $%d", len(args)-2, len(args)-1, len(args)))
		rows, err := conn.Query(ctx, selectEvents+" WHERE "+strings.Join(where, " AND ")+" ORDER BY seq", args...)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("follow: %w", err)
		}
		evs, err := pgx.CollectRows(rows, scanEvent)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("follow: %w", err)
		}
		emitted[src] = last
		for _, e := range evs {
			if err := emit(rowOf(e)); err != nil {
				return err
			}
		}
	}
}
