package audit

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
)

// Durability says when Append returns relative to fsync. Every mode writes
// the record with write(2) before Append returns, so a kill -9 of the
// process loses nothing that Append acknowledged; they differ on power
// loss (docs/audit.md).
type Durability string

const (
	// DurabilityGrouped (the default) returns once the record is written
	// with write(2); a background fsync covers everything written at most
	// SyncInterval (10 ms) later. A power loss or kernel crash can lose
	// the events of the last interval (plus the fsync in progress), never
	// more, and never anything the collector already holds.
	DurabilityGrouped Durability = "fsync-grouped"
	// DurabilityPerEvent returns only after an fsync that covers the
	// record. Appends waiting at the same time share one fsync (group
	// commit): the first waiter fsyncs for everyone written so far.
	DurabilityPerEvent Durability = "fsync-per-event"
)

// ParseDurability checks a configured durability ("" is the default).
func ParseDurability(s string) (Durability, error) {
	switch d := Durability(s); d {
	case "":
		return DurabilityGrouped, nil
	case DurabilityGrouped, DurabilityPerEvent:
		return d, nil
	}
	return "", fmt.Errorf("durability %q is not %s or %s", s, DurabilityGrouped, DurabilityPerEvent)
}

// ParseFullPolicy checks a configured on-full policy ("" is the default).
func ParseFullPolicy(s string) (FullPolicy, error) {
	switch p := FullPolicy(s); p {
	case "":
		return FailClosed, nil
	case FailClosed, FailOpenWithAlarm:
		return p, nil
	}
	return "", fmt.Errorf("on_full %q is not %s or %s", s, FailClosed, FailOpenWithAlarm)
}

// FullPolicy says what Append does when the spool holds MaxBytes.
type FullPolicy string

const (
	// FailClosed (the default) refuses the event with a *FullError, which
	// makes the enforcer deny the request.
	FailClosed FullPolicy = "fail-closed"
	// FailOpenWithAlarm keeps appending past MaxBytes, up to
	// MaxBytes+OverflowBytes, counting and logging each such event; past
	// that the event is written to the log in full at error level (its
	// only copy) and counted as spilled, and the request is allowed.
	FailOpenWithAlarm FullPolicy = "fail-open-with-alarm"
)

// ErrSpoolFull is matched (errors.Is) by the error Append returns at the
// bound under FailClosed.
var ErrSpoolFull = errors.New("audit spool full")

// FullError is the error Append returns at the bound under FailClosed.
type FullError struct{ Used, Max int64 }

func (e *FullError) Error() string {
	return fmt.Sprintf("audit spool full (%d of %d bytes, not yet acknowledged by the collector; policy fail-closed)", e.Used, e.Max)
}

// Is makes errors.Is(err, ErrSpoolFull) true.
func (e *FullError) Is(target error) bool { return target == ErrSpoolFull }

// SpoolOptions configure a Spool.
type SpoolOptions struct {
	Dir string
	// Source is the SPIFFE ID of the recorder; every event appended gets it.
	Source       string
	Durability   Durability    // default DurabilityGrouped
	SyncInterval time.Duration // default 10ms
	SegmentBytes int64         // default 16 MiB
	MaxBytes     int64         // default 1 GiB
	OnFull       FullPolicy    // default FailClosed
	// OverflowBytes is how far FailOpenWithAlarm may go past MaxBytes
	// (default MaxBytes/4).
	OverflowBytes int64
	Clock         clockwork.Clock
	Logger        *slog.Logger
	Registerer    prometheus.Registerer // optional
}

const (
	segMagic      = "WRITSPL1"
	segHeaderSize = 64
	recHeaderSize = 16 // length u32, crc32c u32, seq u64
	// MaxRecordBytes bounds one event's encoding.
	MaxRecordBytes = 1 << 20
	segSuffix      = ".seg"
	// maxKeptRecBuf bounds the record buffer kept between appends, so
	// one huge event does not pin a megabyte.
	maxKeptRecBuf = 64 << 10
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Spool is the local, segmented, CRC-checked log of a source's events. It
// is safe for concurrent use; one process at a time owns a directory (an
// flock enforces it).
type Spool struct {
	o      SpoolOptions
	log    *slog.Logger
	m      *spoolMetrics
	lockF  *os.File
	pendC  chan struct{} // wakes the syncer
	notify chan struct{} // wakes a reader: data became durable
	done   chan struct{}
	wg     sync.WaitGroup

	mu       sync.Mutex // guards the fields below
	rec      []byte     // the record being built, reused
	segs     []*segment
	active   *os.File
	toSync   []*os.File // rotated segments not yet fsynced
	total    int64
	nextSeq  uint64
	head     Hash
	acked    uint64
	ackedAt  time.Time // when Ack last wrote the acked file
	broken   error
	closed   bool
	lastWarn time.Time

	fsyncMu sync.Mutex // serializes fsyncs

	ackMu      sync.Mutex // serializes writes of the acked file
	ackWritten uint64     // the seq the acked file holds

	sm       sync.Mutex // guards synced, syncErr
	cond     *sync.Cond
	synced   uint64
	syncErr  error
	lastSync time.Time
}

type segment struct {
	first, last uint64 // last = first-1 when empty
	prev        Hash   // chain head before first
	path        string
	size        int64 // bytes of complete records, header included
}

type spoolMetrics struct {
	appends, refused, overflow, spilled prometheus.Counter
	bytes                               prometheus.Gauge
	fsyncs                              prometheus.Histogram
}

func newSpoolMetrics(r prometheus.Registerer) *spoolMetrics {
	m := &spoolMetrics{
		appends:  prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_audit_spool_appends_total", Help: "Events appended to the audit spool."}),
		refused:  prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_audit_spool_full_refusals_total", Help: "Events refused because the spool was full (fail-closed): each denied its request."}),
		overflow: prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_audit_spool_overflow_total", Help: "Events appended past the spool bound (fail-open-with-alarm)."}),
		spilled:  prometheus.NewCounter(prometheus.CounterOpts{Name: "writ_audit_spool_spilled_to_log_total", Help: "Events past the overflow bound, written only to the log (fail-open-with-alarm)."}),
		bytes:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "writ_audit_spool_bytes", Help: "Bytes held by the audit spool."}),
		fsyncs:   prometheus.NewHistogram(prometheus.HistogramOpts{Name: "writ_audit_spool_fsync_seconds", Help: "Duration of spool fsyncs.", Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)}),
	}
	if r != nil {
		r.MustRegister(m.appends, m.refused, m.overflow, m.spilled, m.bytes, m.fsyncs)
	}
	return m
}

// OpenSpool opens or creates the spool in o.Dir and recovers it: a torn
// record at the end of the last segment (a crash mid-write) is truncated
// away; a bad record anywhere else, a gap between segments or a broken
// hash chain is corruption, and OpenSpool refuses with an error naming the
// file and offset rather than guessing.
func OpenSpool(o SpoolOptions) (*Spool, error) {
	if o.Dir == "" || o.Source == "" {
		return nil, errors.New("audit spool: dir and source are required")
	}
	var err error
	if o.Durability, err = ParseDurability(string(o.Durability)); err != nil {
		return nil, fmt.Errorf("audit spool: %w", err)
	}
	if o.OnFull, err = ParseFullPolicy(string(o.OnFull)); err != nil {
		return nil, fmt.Errorf("audit spool: %w", err)
	}
	if o.SyncInterval <= 0 {
		o.SyncInterval = 10 * time.Millisecond
	}
	if o.SegmentBytes <= 0 {
		o.SegmentBytes = 16 << 20
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = 1 << 30
	}
	if o.SegmentBytes > o.MaxBytes {
		o.SegmentBytes = o.MaxBytes
	}
	if o.OverflowBytes <= 0 {
		o.OverflowBytes = o.MaxBytes / 4
	}
	if o.Clock == nil {
		o.Clock = clockwork.NewRealClock()
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit spool: %w", err)
	}
	lf, err := os.OpenFile(filepath.Join(o.Dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit spool: %w", err)
	}
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lf.Close()
		return nil, fmt.Errorf("audit spool: %s is in use by another process: %w", o.Dir, err)
	}
	s := &Spool{o: o, log: o.Logger, m: newSpoolMetrics(o.Registerer), lockF: lf,
		pendC: make(chan struct{}, 1), notify: make(chan struct{}, 1), done: make(chan struct{})}
	s.cond = sync.NewCond(&s.sm)
	if err := s.recover(); err != nil {
		lf.Close()
		return nil, err
	}
	if o.Durability != DurabilityPerEvent {
		s.wg.Add(1)
		go s.syncer()
	}
	return s, nil
}

func (s *Spool) recover() error {
	if seq, err := readAcked(filepath.Join(s.o.Dir, "acked")); err == nil {
		s.acked, s.ackWritten = seq, seq
	} else if !errors.Is(err, os.ErrNotExist) {
		// Written by an older version without fsync, or damaged: a
		// torn or empty file must not keep the decision point from
		// starting. Shipping again from the oldest segment still here
		// (below) is safe, since the collector keeps one copy of each
		// event; trusting a damaged number could skip events.
		s.log.Warn("audit spool: acked file unreadable; shipping again from the oldest segment", "err", err)
	}
	ents, err := os.ReadDir(s.o.Dir)
	if err != nil {
		return fmt.Errorf("audit spool: %w", err)
	}
	var names []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), segSuffix) {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	for i, name := range names {
		last := i == len(names)-1
		seg, err := s.scanSegment(filepath.Join(s.o.Dir, name), last)
		if err != nil {
			return err
		}
		if seg == nil { // a torn segment creation: only possible last
			continue
		}
		if n := len(s.segs); n > 0 {
			prev := s.segs[n-1]
			if seg.first != prev.last+1 || seg.prev != s.head {
				return fmt.Errorf("audit spool: corrupt: %s does not continue %s (first seq %d, want %d, or chain head differs)", name, filepath.Base(prev.path), seg.first, prev.last+1)
			}
		}
		s.segs = append(s.segs, &seg.segment)
		s.total += seg.size
		s.head = seg.tailHash
		s.nextSeq = seg.last + 1
	}
	if len(s.segs) == 0 {
		first := s.acked + 1
		if s.acked > 0 {
			s.log.Warn("audit spool: no segments but events were acknowledged; the chain restarts", "next_seq", first)
		}
		if err := s.newSegment(first, Hash{}); err != nil {
			return err
		}
		s.nextSeq = first
	} else {
		cur := s.segs[len(s.segs)-1]
		f, err := os.OpenFile(cur.path, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return fmt.Errorf("audit spool: %w", err)
		}
		if err := f.Sync(); err != nil { // what survived a kill -9 is made durable now
			f.Close()
			return fmt.Errorf("audit spool: fsync %s: %w", cur.path, err)
		}
		s.active = f
	}
	// The acked file lags the acknowledgements by up to ackWriteEvery,
	// and segments are deleted before it is rewritten: after a crash it
	// may lag (a resend follows, which the collector ignores), point
	// before the first segment still here, or be missing.
	if first := s.segs[0].first; s.acked < first-1 {
		s.acked = first - 1
	}
	if s.acked > s.nextSeq-1 {
		s.log.Error("audit spool: acknowledged past the last event on disk; the disk lost fsynced data", "acked", s.acked, "last", s.nextSeq-1)
		s.acked = s.nextSeq - 1
	}
	s.synced = s.nextSeq - 1
	s.lastSync = s.o.Clock.Now() // recovery fsynced what it found
	s.m.bytes.Set(float64(s.total))
	return nil
}

// scanSegment reads and checks one segment; last says whether a torn tail
// may be truncated.
func (s *Spool) scanSegment(path string, last bool) (*scannedSeg, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("audit spool: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("audit spool: %w", err)
	}
	size := st.Size()
	hdr := make([]byte, segHeaderSize)
	if _, err := f.ReadAt(hdr, 0); err != nil || !validHeader(hdr) {
		if last && size < segHeaderSize {
			// Created but its header never fully written: nothing in it.
			s.log.Warn("audit spool: removing a segment torn at creation", "file", path)
			if err := os.Remove(path); err != nil {
				return nil, fmt.Errorf("audit spool: %w", err)
			}
			return nil, nil
		}
		return nil, fmt.Errorf("audit spool: corrupt: %s has a bad header", path)
	}
	seg := &scannedSeg{segment: segment{path: path, first: binary.BigEndian.Uint64(hdr[8:16])}}
	copy(seg.prev[:], hdr[16:48])
	seg.tailHash = seg.prev
	seg.last = seg.first - 1
	off := int64(segHeaderSize)
	rh := make([]byte, recHeaderSize)
	var buf []byte
	for off < size {
		torn := func(why string) (*scannedSeg, error) {
			if !last {
				return nil, fmt.Errorf("audit spool: corrupt: %s at offset %d: %s (not the last segment)", path, off, why)
			}
			s.log.Warn("audit spool: truncating a torn record at the end of the spool", "file", path, "offset", off, "lost_bytes", size-off, "why", why)
			if err := f.Truncate(off); err != nil {
				return nil, fmt.Errorf("audit spool: truncate %s: %w", path, err)
			}
			if err := f.Sync(); err != nil {
				return nil, fmt.Errorf("audit spool: fsync %s: %w", path, err)
			}
			seg.size = off
			return seg, nil
		}
		if size-off < recHeaderSize {
			return torn("partial record header")
		}
		if _, err := f.ReadAt(rh, off); err != nil {
			return nil, fmt.Errorf("audit spool: read %s: %w", path, err)
		}
		n := int64(binary.BigEndian.Uint32(rh[0:4]))
		end := off + recHeaderSize + n
		if n > MaxRecordBytes || end > size {
			// A length running past the end is a record cut short; one
			// that fits but is absurd is damage.
			if end > size {
				return torn("record runs past the end of the file")
			}
			return nil, fmt.Errorf("audit spool: corrupt: %s at offset %d: record length %d", path, off, n)
		}
		if int64(cap(buf)) < n {
			buf = make([]byte, n)
		}
		buf = buf[:n]
		if _, err := f.ReadAt(buf, off+recHeaderSize); err != nil {
			return nil, fmt.Errorf("audit spool: read %s: %w", path, err)
		}
		crc := crc32.Update(crc32.Checksum(rh[8:16], castagnoli), castagnoli, buf)
		if crc != binary.BigEndian.Uint32(rh[4:8]) {
			if end == size {
				return torn("checksum mismatch in the last record")
			}
			return nil, fmt.Errorf("audit spool: corrupt: %s at offset %d: checksum mismatch with %d bytes of records after it; refusing to guess (move the spool aside to start a new one)", path, off, size-end)
		}
		seq := binary.BigEndian.Uint64(rh[8:16])
		ev, err := Unmarshal(buf)
		if err != nil || seq != seg.last+1 || ev.Seq != seq || ev.PrevHash != seg.tailHash {
			return nil, fmt.Errorf("audit spool: corrupt: %s at offset %d: record %d does not continue the chain (%v)", path, off, seq, err)
		}
		seg.last = seq
		seg.tailHash = ev.Hash
		off = end
	}
	seg.size = off
	return seg, nil
}

type scannedSeg struct {
	segment
	tailHash Hash
}

func validHeader(h []byte) bool {
	return string(h[:8]) == segMagic && crc32.Checksum(h[:48], castagnoli) == binary.BigEndian.Uint32(h[48:52])
}

func segName(first uint64) string { return fmt.Sprintf("%020d%s", first, segSuffix) }

// newSegment creates and fsyncs a segment (and the directory entry) and
// makes it active. The caller holds mu or owns s exclusively.
func (s *Spool) newSegment(first uint64, prev Hash) error {
	path := filepath.Join(s.o.Dir, segName(first))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("audit spool: new segment: %w", err)
	}
	hdr := make([]byte, segHeaderSize)
	copy(hdr, segMagic)
	binary.BigEndian.PutUint64(hdr[8:16], first)
	copy(hdr[16:48], prev[:])
	binary.BigEndian.PutUint32(hdr[48:52], crc32.Checksum(hdr[:48], castagnoli))
	if _, err := f.Write(hdr); err != nil {
		f.Close()
		return fmt.Errorf("audit spool: new segment: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("audit spool: new segment: %w", err)
	}
	if err := syncDir(s.o.Dir); err != nil {
		f.Close()
		return err
	}
	s.segs = append(s.segs, &segment{first: first, last: first - 1, prev: prev, path: path, size: segHeaderSize})
	s.total += segHeaderSize
	s.active = f
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("audit spool: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("audit spool: fsync dir: %w", err)
	}
	return nil
}

// Source is the recorder identity events get.
func (s *Spool) Source() string { return s.o.Source }

// Append seals ev into the source's chain (setting Source, Seq, PrevHash
// and Hash) and writes it. It returns once the record is written with
// write(2) and, under DurabilityPerEvent, fsynced. At the bound it follows
// OnFull: a *FullError under FailClosed. ctx is not consulted once the
// record is written: a written event is always waited for, so that an
// error never accompanies a recorded event.
func (s *Spool) Append(ctx context.Context, ev *Event) error {
	if err := ev.Validate(); err != nil {
		return fmt.Errorf("audit spool: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// Hash what PostgreSQL will give back: canonical attributes and
	// microsecond UTC times.
	if !ev.attrsCanonical() {
		attrs, err := CanonicalJSON(ev.Attributes)
		if err != nil {
			return fmt.Errorf("audit spool: event %s: %w", ev.ID, err)
		}
		ev.Attributes = attrs
	}
	ev.Time = NormalizeTime(ev.Time)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("audit spool: closed")
	}
	if s.broken != nil {
		s.mu.Unlock()
		return fmt.Errorf("audit spool: unusable after a write error: %w", s.broken)
	}
	ev.Source, ev.Seq, ev.PrevHash = s.o.Source, s.nextSeq, s.head
	// The record is built in place in a buffer kept across appends (mu
	// serializes them): allocating it, its encoding and its copy per
	// event made the slow appends' build phase, not the write(2), the
	// larger part of the tail (docs/audit.md, Benchmarks).
	if cap(s.rec) < recHeaderSize {
		s.rec = make([]byte, 0, 2048)
	}
	rec := ev.sealInto(s.rec[:recHeaderSize])
	if cap(rec) <= maxKeptRecBuf {
		s.rec = rec[:0]
	} else {
		s.rec = nil
	}
	payloadLen := len(rec) - recHeaderSize
	if payloadLen > MaxRecordBytes {
		s.mu.Unlock()
		return fmt.Errorf("audit spool: event %s is %d bytes, over %d", ev.ID, payloadLen, MaxRecordBytes)
	}
	binary.BigEndian.PutUint32(rec[0:4], uint32(payloadLen))
	binary.BigEndian.PutUint64(rec[8:16], ev.Seq)
	binary.BigEndian.PutUint32(rec[4:8], crc32.Checksum(rec[8:], castagnoli))
	need := int64(len(rec))
	if s.total+need > s.o.MaxBytes {
		if s.o.OnFull == FailClosed {
			used := s.total
			s.mu.Unlock()
			s.m.refused.Inc()
			return &FullError{Used: used, Max: s.o.MaxBytes}
		}
		if s.total+need > s.o.MaxBytes+s.o.OverflowBytes {
			s.mu.Unlock()
			s.m.spilled.Inc()
			// The log is this event's only copy: say so loudly, in full.
			s.log.Error("audit spool: past its overflow bound; event written to this log only",
				"event_id", ev.ID.String(), "kind", ev.Kind, "time", ev.Time, "principal", ev.Principal,
				"destination", ev.Destination, "action", ev.Action, "resource", ev.Resource,
				"result", ev.Result, "status", ev.Status, "reason", ev.Reason, "policy_revision", ev.PolicyRevision,
				"attributes", string(ev.Attributes))
			return nil
		}
		s.m.overflow.Inc()
		if now := s.o.Clock.Now(); now.Sub(s.lastWarn) > 10*time.Second {
			s.lastWarn = now
			s.log.Error("audit spool: over its bound (fail-open-with-alarm): events kept past max_bytes", "bytes", s.total, "max_bytes", s.o.MaxBytes)
		}
	}
	cur := s.segs[len(s.segs)-1]
	if cur.size+need > s.o.SegmentBytes && cur.last >= cur.first {
		if err := s.rotate(); err != nil {
			s.broken = err
			s.mu.Unlock()
			return err
		}
		cur = s.segs[len(s.segs)-1]
	}
	if _, err := s.active.Write(rec); err != nil {
		// Put the file back to its last complete record if we can; in
		// any case refuse from now on: fail closed.
		_ = s.active.Truncate(cur.size)
		s.broken = fmt.Errorf("write %s: %w", cur.path, err)
		s.mu.Unlock()
		return fmt.Errorf("audit spool: %w", s.broken)
	}
	cur.size += need
	cur.last = ev.Seq
	s.total += need
	s.nextSeq++
	s.head = ev.Hash
	seq := ev.Seq
	total := s.total
	s.mu.Unlock()
	s.m.appends.Inc()
	s.m.bytes.Set(float64(total))

	if s.o.Durability == DurabilityPerEvent {
		return s.syncTo(seq)
	}
	s.poke()
	return nil
}

// rotate seals the active segment and starts the next one. The old file
// stays open until the syncer has fsynced it. The caller holds mu.
func (s *Spool) rotate() error {
	s.toSync = append(s.toSync, s.active)
	s.active = nil
	return s.newSegment(s.nextSeq, s.head)
}

func (s *Spool) poke() {
	select {
	case s.pendC <- struct{}{}:
	default:
	}
}

// syncTo fsyncs everything written so far unless an fsync already covered
// seq. Concurrent callers share fsyncs.
func (s *Spool) syncTo(seq uint64) error {
	s.fsyncMu.Lock()
	defer s.fsyncMu.Unlock()
	s.sm.Lock()
	if s.synced >= seq || s.syncErr != nil {
		err := s.syncErr
		if s.synced >= seq {
			err = nil
		}
		s.sm.Unlock()
		return err
	}
	s.sm.Unlock()
	return s.syncNow()
}

// syncNow fsyncs rotated segments and the active one. The caller holds
// fsyncMu.
func (s *Spool) syncNow() error {
	s.mu.Lock()
	files := append([]*os.File(nil), s.toSync...)
	s.toSync = s.toSync[:0]
	active := s.active
	target := s.nextSeq - 1
	s.mu.Unlock()
	start := time.Now()
	var err error
	for _, f := range files {
		if e := f.Sync(); e != nil && err == nil {
			err = e
		}
		f.Close()
	}
	if active != nil {
		if e := active.Sync(); e != nil && err == nil && !errors.Is(e, os.ErrClosed) {
			err = e
		}
	}
	s.m.fsyncs.Observe(time.Since(start).Seconds())
	s.sm.Lock()
	if err != nil {
		// After a failed fsync the page cache may have dropped the data:
		// nothing written since the last good fsync can be trusted.
		s.syncErr = fmt.Errorf("audit spool: fsync: %w", err)
		s.mu.Lock()
		s.broken = s.syncErr
		s.mu.Unlock()
	} else if target > s.synced {
		s.synced = target
	}
	s.lastSync = s.o.Clock.Now()
	s.cond.Broadcast()
	s.sm.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
	return err
}

// syncer runs the grouped fsyncs: after data arrives it fsyncs at once if
// the last fsync is at least SyncInterval old, else when it becomes so.
func (s *Spool) syncer() {
	defer s.wg.Done()
	for {
		select {
		case <-s.done:
			return
		case <-s.pendC:
		}
		s.sm.Lock()
		wait := s.o.SyncInterval - s.o.Clock.Since(s.lastSync)
		s.sm.Unlock()
		if wait > 0 {
			select {
			case <-s.done:
			case <-s.o.Clock.After(wait):
			}
		}
		s.fsyncMu.Lock()
		_ = s.syncNow()
		s.fsyncMu.Unlock()
	}
}

// Sync fsyncs everything appended so far.
func (s *Spool) Sync() error {
	s.fsyncMu.Lock()
	defer s.fsyncMu.Unlock()
	return s.syncNow()
}

// Close fsyncs and closes the spool. Appends after Close fail.
func (s *Spool) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	close(s.done)
	s.wg.Wait()
	err := s.Sync()
	if aerr := s.writeAcked(); err == nil {
		err = aerr
	}
	s.mu.Lock()
	if s.active != nil {
		s.active.Close()
	}
	s.mu.Unlock()
	s.sm.Lock()
	if s.syncErr == nil {
		s.syncErr = errors.New("audit spool: closed")
	}
	s.cond.Broadcast()
	s.sm.Unlock()
	s.lockF.Close()
	return err
}

// Stats describe a spool's state.
type Stats struct {
	Bytes    int64
	Segments int
	NextSeq  uint64 // the sequence number the next event gets
	Synced   uint64 // events up to this one are fsynced
	Acked    uint64 // events up to this one are committed in PostgreSQL
	Head     Hash
}

// Stats returns the current state.
func (s *Spool) Stats() Stats {
	s.mu.Lock()
	st := Stats{Bytes: s.total, Segments: len(s.segs), NextSeq: s.nextSeq, Acked: s.acked, Head: s.head}
	s.mu.Unlock()
	s.sm.Lock()
	st.Synced = s.synced
	s.sm.Unlock()
	return st
}

// Ack records that events up to seq are committed by the collector and
// deletes the segments they fill entirely (never the active one). The
// acknowledgement is kept in a file so that a restarted shipper resumes
// after it; losing that file only causes a resend, which the collector
// ignores.
func (s *Spool) Ack(seq uint64) error {
	s.mu.Lock()
	if seq <= s.acked {
		s.mu.Unlock()
		return nil
	}
	if seq >= s.nextSeq {
		s.mu.Unlock()
		return fmt.Errorf("audit spool: ack %d beyond the last event %d", seq, s.nextSeq-1)
	}
	s.acked = seq
	deleted := false
	for len(s.segs) > 1 && s.segs[0].last <= seq {
		if err := os.Remove(s.segs[0].path); err != nil {
			s.mu.Unlock()
			return fmt.Errorf("audit spool: delete acknowledged segment: %w", err)
		}
		s.total -= s.segs[0].size
		s.segs = s.segs[1:]
		deleted = true
	}
	s.m.bytes.Set(float64(s.total))
	// The acked file is rewritten at most every ackWriteEvery (and when
	// a segment goes, and at Close), outside mu so that appends on the
	// request path do not wait for it. After a crash it lags by at most
	// that much; recovery already allows for a lagging file, and the
	// collector inserts the events shipped again idempotently.
	now := s.o.Clock.Now()
	write := deleted || now.Sub(s.ackedAt) >= ackWriteEvery
	if write {
		s.ackedAt = now
	}
	s.mu.Unlock()
	if write {
		return s.writeAcked()
	}
	return nil
}

// ackWriteEvery bounds how often Ack rewrites the acked file: the shipper
// acknowledges every batch, about every Linger under load. A crash
// re-ships at most this much, which the collector keeps once.
const ackWriteEvery = time.Second

// writeAcked records the latest acknowledged seq in the acked file.
func (s *Spool) writeAcked() error {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	s.mu.Lock()
	seq := s.acked
	s.mu.Unlock()
	if seq == s.ackWritten {
		return nil
	}
	// Written to a temporary file and fsynced before the rename, then
	// the directory: otherwise a power loss can leave the renamed name
	// pointing at an empty or torn file (the rename's metadata reaching
	// the disk before the data). This runs at most about once a second.
	tmp := filepath.Join(s.o.Dir, "acked.tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("audit spool: %w", err)
	}
	_, err = f.Write([]byte(strconv.FormatUint(seq, 10) + "\n"))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("audit spool: acked file: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(s.o.Dir, "acked")); err != nil {
		return fmt.Errorf("audit spool: %w", err)
	}
	if err := syncDir(s.o.Dir); err != nil {
		return err
	}
	s.ackWritten = seq
	return nil
}

// readAcked reads the acked file: decimal digits and a newline, nothing
// else. Anything else (empty, zeros, a file cut short before its
// newline: what an older version's unsynced rename could leave after a
// power loss) is an error, which recovery answers with a resend.
func readAcked(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	digits, ok := strings.CutSuffix(string(b), "\n")
	if !ok || digits == "" || strings.TrimLeft(digits, "0123456789") != "" {
		return 0, fmt.Errorf("acked file holds %q, not a sequence number and a newline", trimForLog(b))
	}
	seq, err := strconv.ParseUint(digits, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("acked file: %w", err)
	}
	return seq, nil
}

func trimForLog(b []byte) string {
	if len(b) > 32 {
		b = b[:32]
	}
	return string(b)
}

// Durable returns a channel that receives a value after each fsync, for a
// reader waiting for new events. There is one such channel per spool.
func (s *Spool) Durable() <-chan struct{} { return s.notify }

// ReadBatch returns the encoded events (Marshal form) from seq from on,
// at most maxEvents and about maxBytes, only among those already fsynced.
// It returns nothing when no such event exists yet.
func (s *Spool) ReadBatch(r *Reader, from uint64, maxEvents, maxBytes int) ([][]byte, error) {
	var out [][]byte
	_, err := s.read(r, from, maxEvents, maxBytes, func(payload []byte) {
		out = append(out, append([]byte(nil), payload...))
	}, nil)
	return out, err
}

// ReadFramed is ReadBatch appending to dst in EncodeBatch's framing, with
// one copy per event and no allocation when dst has room: what the
// shipper sends. It returns dst and how many events it appended.
func (s *Spool) ReadFramed(r *Reader, from uint64, maxEvents, maxBytes int, dst []byte) ([]byte, int, error) {
	n, err := s.read(r, from, maxEvents, maxBytes, func(payload []byte) {
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
		dst = append(dst, payload...)
	}, func(avail int64, first int) {
		// Grown once to about the batch's size (maxEvents records like
		// the first, or maxBytes, or what the segment holds: a frame is
		// smaller than a spool record), not by doubling through a
		// backlog's batch of megabytes.
		est := min(avail, int64(maxBytes)+4*int64(maxEvents), int64(maxEvents)*int64(4+first)+int64(first))
		dst = slices.Grow(dst, int(est))
	})
	return dst, n, err
}

// read passes emit the payloads of the fsynced records from seq from on
// (emit must copy what it keeps) and returns how many it passed. hint, if
// set, is told first how many bytes of records the segment holds from
// there on (fsynced or not) and the size of the first payload.
func (s *Spool) read(r *Reader, from uint64, maxEvents, maxBytes int, emit func(payload []byte), hint func(avail int64, first int)) (int, error) {
	s.sm.Lock()
	limit := s.synced
	s.sm.Unlock()
	if from > limit {
		return 0, nil
	}
	count, size := 0, 0
	for from <= limit && count < maxEvents && size < maxBytes {
		if r.f == nil || from > r.seg.last || r.next != from {
			if err := s.position(r, from); err != nil {
				return count, err
			}
		}
		s.mu.Lock()
		end := r.seg.size
		s.mu.Unlock()
		if r.off >= end {
			break // a rotated-in segment with nothing durable yet
		}
		// One read for many records, in a bounded buffer (a backlog is
		// read in pieces rather than into one buffer the size of the
		// batch, which the reader would keep): at most readChunk, or one
		// whole record larger than that.
		want := min(end-r.off, readChunk)
		var chunk []byte
		for {
			if int64(cap(r.buf)) < want {
				r.buf = make([]byte, want)
			}
			chunk = r.buf[:want]
			if _, err := r.f.ReadAt(chunk, r.off); err != nil {
				return count, fmt.Errorf("audit spool: read %s: %w", r.seg.path, err)
			}
			if want < end-r.off && len(chunk) >= recHeaderSize {
				if n := int64(recHeaderSize) + int64(binary.BigEndian.Uint32(chunk[0:4])); n > want && n <= end-r.off {
					want = n
					continue
				}
			}
			break
		}
		if hint != nil && len(chunk) >= recHeaderSize {
			hint(end-r.off, int(binary.BigEndian.Uint32(chunk[0:4])))
			hint = nil
		}
		progressed := false
		for len(chunk) >= recHeaderSize && from <= limit && count < maxEvents && size < maxBytes {
			n := int(binary.BigEndian.Uint32(chunk[0:4]))
			if recHeaderSize+n > len(chunk) {
				break
			}
			payload := chunk[recHeaderSize : recHeaderSize+n]
			if crc32.Update(crc32.Checksum(chunk[8:16], castagnoli), castagnoli, payload) != binary.BigEndian.Uint32(chunk[4:8]) {
				return count, fmt.Errorf("audit spool: %s at offset %d: checksum mismatch", r.seg.path, r.off)
			}
			if seq := binary.BigEndian.Uint64(chunk[8:16]); seq != from {
				return count, fmt.Errorf("audit spool: %s at offset %d: seq %d, want %d", r.seg.path, r.off, seq, from)
			}
			emit(payload)
			count++
			size += n
			r.off += int64(recHeaderSize + n)
			chunk = chunk[recHeaderSize+n:]
			from++
			r.next = from
			progressed = true
		}
		if !progressed {
			break
		}
	}
	if cap(r.buf) > readChunk {
		r.buf = nil // grown for one large record: not kept
	}
	return count, nil
}

// readChunk bounds a reader's buffer for records of the usual size.
const readChunk = 64 << 10

// Reader is a read position in a spool, used by one goroutine.
type Reader struct {
	buf  []byte
	f    *os.File
	seg  *segment
	off  int64
	next uint64
}

// Close releases the reader's file.
func (r *Reader) Close() {
	if r.f != nil {
		r.f.Close()
		r.f = nil
	}
}

// position moves r to the record seq by scanning its segment.
func (s *Spool) position(r *Reader, seq uint64) error {
	s.mu.Lock()
	var seg *segment
	for _, g := range s.segs {
		if g.first <= seq && (seq <= g.last || g == s.segs[len(s.segs)-1]) {
			seg = g
			break
		}
	}
	s.mu.Unlock()
	if seg == nil {
		return fmt.Errorf("audit spool: event %d is no longer in the spool", seq)
	}
	r.Close()
	f, err := os.Open(seg.path)
	if err != nil {
		return fmt.Errorf("audit spool: %w", err)
	}
	r.f, r.seg, r.off, r.next = f, seg, segHeaderSize, seg.first
	hdr := make([]byte, recHeaderSize)
	for r.next < seq {
		if _, err := f.ReadAt(hdr, r.off); err != nil {
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("audit spool: event %d not found in %s", seq, seg.path)
			}
			return fmt.Errorf("audit spool: %w", err)
		}
		r.off += int64(recHeaderSize) + int64(binary.BigEndian.Uint32(hdr[0:4]))
		r.next++
	}
	return nil
}
