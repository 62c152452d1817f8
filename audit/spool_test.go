package audit

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	dto "github.com/prometheus/client_model/go"
)

const testSource = "spiffe://example.org/ns/default/sa/proxy"

func testEvent(t testing.TB, i int) *Event {
	t.Helper()
	ev, err := NewEvent(KindRequest, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ev.Principal = "spiffe://example.org/ns/a/sa/client"
	ev.Destination = "spiffe://example.org/ns/b/sa/server"
	ev.Action, ev.Resource, ev.Result, ev.Status = "GET", fmt.Sprintf("/items/%d", i), "allow", 200
	return &ev
}

func openTest(t *testing.T, o SpoolOptions) *Spool {
	t.Helper()
	if o.Source == "" {
		o.Source = testSource
	}
	s, err := OpenSpool(o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// readAll reads every durable event from seq 1 and checks the chain.
func readAll(t *testing.T, s *Spool, from uint64) []Event {
	t.Helper()
	var r Reader
	defer r.Close()
	var out []Event
	for {
		b, err := s.ReadBatch(&r, from, 100, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) == 0 {
			return out
		}
		for _, raw := range b {
			ev, err := Unmarshal(raw)
			if err != nil {
				t.Fatal(err)
			}
			if ev.Seq != from {
				t.Fatalf("got seq %d, want %d", ev.Seq, from)
			}
			if len(out) > 0 && ev.PrevHash != out[len(out)-1].Hash {
				t.Fatalf("seq %d: prev hash does not match", ev.Seq)
			}
			out = append(out, ev)
			from++
		}
	}
}

func TestSpoolAppendReopenRotateAck(t *testing.T) {
	for _, d := range []Durability{DurabilityGrouped, DurabilityPerEvent} {
		t.Run(string(d), func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, SpoolOptions{Dir: dir, Durability: d, SegmentBytes: 4096})
			for i := range 100 {
				if err := s.Append(context.Background(), testEvent(t, i)); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Sync(); err != nil {
				t.Fatal(err)
			}
			if got := len(readAll(t, s, 1)); got != 100 {
				t.Fatalf("read %d events, want 100", got)
			}
			st := s.Stats()
			if st.Segments < 3 {
				t.Fatalf("segments = %d, want rotation into several", st.Segments)
			}
			if err := s.Ack(60); err != nil {
				t.Fatal(err)
			}
			if s.Stats().Segments >= st.Segments || s.Stats().Bytes >= st.Bytes {
				t.Fatalf("ack deleted nothing: %+v -> %+v", st, s.Stats())
			}
			head := s.Stats().Head
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openTest(t, SpoolOptions{Dir: dir, Durability: d, SegmentBytes: 4096})
			defer s.Close()
			if got := s.Stats(); got.NextSeq != 101 || got.Acked != 60 || got.Head != head {
				t.Fatalf("reopened: %+v, want next 101, acked 60, same head", got)
			}
			if err := s.Append(context.Background(), testEvent(t, 100)); err != nil {
				t.Fatal(err)
			}
			_ = s.Sync()
			evs := readAll(t, s, 61)
			if len(evs) != 41 || evs[len(evs)-1].Seq != 101 {
				t.Fatalf("after reopen read %d events", len(evs))
			}
		})
	}
}

func lastSegment(t *testing.T, dir string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	sort.Strings(m)
	if len(m) == 0 {
		t.Fatal("no segments")
	}
	return m[len(m)-1]
}

func TestSpoolTornTailIsTruncated(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, SpoolOptions{Dir: dir, Durability: DurabilityPerEvent})
	for i := range 10 {
		if err := s.Append(context.Background(), testEvent(t, i)); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	seg := lastSegment(t, dir)
	st, _ := os.Stat(seg)
	// Cut the last record in the middle, as a crash during write(2) can.
	if err := os.Truncate(seg, st.Size()-37); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, SpoolOptions{Dir: dir})
	defer s.Close()
	if got := s.Stats().NextSeq; got != 10 {
		t.Fatalf("next seq after torn tail = %d, want 10 (record 10 dropped)", got)
	}
	if got := len(readAll(t, s, 1)); got != 9 {
		t.Fatalf("read %d, want 9", got)
	}
	// The chain continues from record 9.
	if err := s.Append(context.Background(), testEvent(t, 10)); err != nil {
		t.Fatal(err)
	}
	_ = s.Sync()
	if got := len(readAll(t, s, 1)); got != 10 {
		t.Fatalf("read %d, want 10", got)
	}
}

func TestSpoolTornChecksumAtEndIsTruncated(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, SpoolOptions{Dir: dir, Durability: DurabilityPerEvent})
	for i := range 5 {
		_ = s.Append(context.Background(), testEvent(t, i))
	}
	s.Close()
	seg := lastSegment(t, dir)
	flipByte(t, seg, -3)
	s = openTest(t, SpoolOptions{Dir: dir})
	defer s.Close()
	if got := s.Stats().NextSeq; got != 5 {
		t.Fatalf("next seq = %d, want 5", got)
	}
}

func flipByte(t *testing.T, path string, at int64) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if at < 0 {
		at += int64(len(b))
	}
	b[at] ^= 0xff
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestSpoolCorruptionInTheMiddleIsRefused(t *testing.T) {
	tests := []struct {
		name string
		// damage changes the spool in dir
		damage func(t *testing.T, dir string)
		want   string
	}{
		{"checksum in last segment with records after", func(t *testing.T, dir string) {
			flipByte(t, lastSegment(t, dir), segHeaderSize+recHeaderSize+20)
		}, "checksum mismatch with"},
		{"torn record in an earlier segment", func(t *testing.T, dir string) {
			m, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
			sort.Strings(m)
			st, _ := os.Stat(m[0])
			_ = os.Truncate(m[0], st.Size()-5)
		}, "not the last segment"},
		{"missing segment", func(t *testing.T, dir string) {
			m, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
			sort.Strings(m)
			_ = os.Remove(m[1])
		}, "does not continue"},
		{"bad header", func(t *testing.T, dir string) {
			m, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
			sort.Strings(m)
			flipByte(t, m[0], 3)
		}, "bad header"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, SpoolOptions{Dir: dir, SegmentBytes: 2048, Durability: DurabilityGrouped})
			for i := range 40 {
				_ = s.Append(context.Background(), testEvent(t, i))
			}
			s.Close()
			tc.damage(t, dir)
			_, err := OpenSpool(SpoolOptions{Dir: dir, Source: testSource})
			if err == nil || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("open: got %v, want a corruption error mentioning %q", err, tc.want)
			}
		})
	}
}

func TestSpoolBoundFailClosed(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, SpoolOptions{Dir: dir, MaxBytes: 8192, SegmentBytes: 2048, Durability: DurabilityGrouped})
	defer s.Close()
	n := 0
	var err error
	for ; n < 1000; n++ {
		if err = s.Append(context.Background(), testEvent(t, n)); err != nil {
			break
		}
	}
	var fe *FullError
	if !errors.Is(err, ErrSpoolFull) || !errors.As(err, &fe) || !strings.Contains(err.Error(), "fail-closed") {
		t.Fatalf("append %d: got %v, want a FullError", n, err)
	}
	// Nothing accepted is lost and the refusal took no sequence number.
	_ = s.Sync()
	if got := len(readAll(t, s, 1)); got != n {
		t.Fatalf("spool holds %d events, want the %d accepted", got, n)
	}
	// Acknowledging frees room.
	if err := s.Ack(uint64(n - 1)); err != nil {
		t.Fatal(err)
	}
	if err := s.Append(context.Background(), testEvent(t, n)); err != nil {
		t.Fatalf("after ack: %v", err)
	}
}

func TestSpoolBoundFailOpenWithAlarm(t *testing.T) {
	dir := t.TempDir()
	var logb strings.Builder
	s := openTest(t, SpoolOptions{Dir: dir, MaxBytes: 8192, OverflowBytes: 4096, SegmentBytes: 2048, Durability: DurabilityGrouped,
		OnFull: FailOpenWithAlarm, Logger: newTestLogger(&logb)})
	defer s.Close()
	for i := range 200 {
		if err := s.Append(context.Background(), testEvent(t, i)); err != nil {
			t.Fatalf("append %d: %v", i, err)
		}
	}
	st := s.Stats()
	if st.Bytes <= 8192 || st.Bytes > 8192+4096 {
		t.Fatalf("bytes = %d, want past the bound and within the overflow", st.Bytes)
	}
	kept := int(st.NextSeq - 1)
	if kept >= 200 {
		t.Fatal("no event spilled")
	}
	// Every spilled event is in the log in full.
	if got := strings.Count(logb.String(), "event written to this log only"); got != 200-kept {
		t.Fatalf("log holds %d spilled events, want %d", got, 200-kept)
	}
}

// TestSpoolSurvivesKill9 appends in a child process, kills it with SIGKILL
// mid-stream, and checks that every append the child saw succeed is in the
// spool after recovery.
func TestSpoolSurvivesKill9(t *testing.T) {
	if dir := os.Getenv("WRIT_AUDIT_SPOOL_CHILD"); dir != "" {
		spoolChild(dir)
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestSpoolSurvivesKill9$")
	cmd.Env = append(os.Environ(), "WRIT_AUDIT_SPOOL_CHILD="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	var maxAcked uint64
	for sc.Scan() {
		seq, err := strconv.ParseUint(strings.TrimPrefix(sc.Text(), "acked "), 10, 64)
		if err != nil {
			continue
		}
		maxAcked = seq
		if seq >= 3000 {
			break
		}
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if maxAcked < 3000 {
		t.Fatalf("child acknowledged only %d appends", maxAcked)
	}
	s := openTest(t, SpoolOptions{Dir: dir})
	defer s.Close()
	evs := readAll(t, s, 1)
	if uint64(len(evs)) < maxAcked {
		t.Fatalf("after kill -9 the spool holds %d events; the child had acknowledged %d", len(evs), maxAcked)
	}
	t.Logf("child acknowledged %d, spool recovered %d", maxAcked, len(evs))
}

func spoolChild(dir string) {
	s, err := OpenSpool(SpoolOptions{Dir: dir, Source: testSource, Durability: DurabilityGrouped, SegmentBytes: 64 << 10})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for i := 0; ; i++ {
		ev, _ := NewEvent(KindRequest, time.Now())
		ev.Resource = fmt.Sprintf("/x/%d", i)
		if err := s.Append(context.Background(), &ev); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		// Unbuffered: the parent sees exactly what returned.
		fmt.Fprintf(os.Stdout, "acked %d\n", ev.Seq)
	}
}

// TestSpoolLostAckFile reopens a spool whose acked file is gone after
// acknowledged segments were deleted: reading resumes at the first event
// still on disk instead of asking for deleted ones.
func TestSpoolLostAckFile(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, SpoolOptions{Dir: dir, SegmentBytes: 2048, Durability: DurabilityGrouped})
	for i := range 50 {
		_ = s.Append(context.Background(), testEvent(t, i))
	}
	_ = s.Sync()
	if err := s.Ack(30); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := os.Remove(filepath.Join(dir, "acked")); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, SpoolOptions{Dir: dir})
	defer s.Close()
	st := s.Stats()
	if st.Acked == 0 || st.Acked > 30 {
		t.Fatalf("acked = %d, want the seq before the first segment kept (<= 30)", st.Acked)
	}
	if got := readAll(t, s, st.Acked+1); len(got) != int(50-st.Acked) {
		t.Fatalf("read %d events from %d", len(got), st.Acked+1)
	}
}

// TestSpoolDamagedAckFile reopens a spool whose acked file a power loss
// could have left torn (empty, zeroed, cut short, garbage): it opens,
// and the shipper's next read starts at the first event still on disk,
// so nothing is skipped (the collector ignores what it already holds).
// The next acknowledgement writes a good file again.
func TestSpoolDamagedAckFile(t *testing.T) {
	for name, content := range map[string]string{
		"empty":         "",
		"zeros":         "\x00\x00\x00\x00\x00\x00",
		"cut short":     "3",
		"garbage":       "4x\n",
		"no digits":     "\n",
		"out of range":  "99999999999999999999999\n",
		"space padding": " 40\n",
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, SpoolOptions{Dir: dir, SegmentBytes: 2048})
			for i := range 50 {
				if err := s.Append(context.Background(), testEvent(t, i)); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Sync(); err != nil {
				t.Fatal(err)
			}
			if err := s.Ack(30); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			segs, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
			sort.Strings(segs)
			first, err := strconv.ParseUint(strings.TrimSuffix(filepath.Base(segs[0]), segSuffix), 10, 64)
			if err != nil || first <= 1 || first > 31 {
				t.Fatalf("first segment kept starts at %d (%v): want acknowledged segments deleted", first, err)
			}
			if err := os.WriteFile(filepath.Join(dir, "acked"), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			var logs strings.Builder
			s = openTest(t, SpoolOptions{Dir: dir, Logger: newTestLogger(&logs)})
			defer s.Close()
			if st := s.Stats(); st.Acked != first-1 {
				t.Fatalf("acked = %d, want %d (the seq before the first segment kept)", st.Acked, first-1)
			}
			if !strings.Contains(logs.String(), "acked file unreadable") {
				t.Fatalf("no warning logged: %s", logs.String())
			}
			if got := readAll(t, s, first); len(got) != int(51-first) {
				t.Fatalf("read %d events from %d, want %d", len(got), first, 51-first)
			}
			if err := s.Ack(45); err != nil {
				t.Fatal(err)
			}
			if b, err := os.ReadFile(filepath.Join(dir, "acked")); err != nil || string(b) != "45\n" {
				t.Fatalf("acked file after Ack(45): %q, %v", b, err)
			}
			if _, err := os.Stat(filepath.Join(dir, "acked.tmp")); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("acked.tmp left behind: %v", err)
			}
		})
	}
}

// TestSpoolDurabilityModes checks when each mode's appends are fsynced:
// fsync-grouped returns before any fsync and the background fsync covers
// the record once the interval has passed (on the injected clock);
// fsync-per-event returns only when an fsync covered the record, and
// concurrent appends share fsyncs.
func TestSpoolDurabilityModes(t *testing.T) {
	t.Run(string(DurabilityGrouped), func(t *testing.T) {
		clk := clockwork.NewFakeClock()
		s := openTest(t, SpoolOptions{Dir: t.TempDir(), Durability: DurabilityGrouped, SyncInterval: 10 * time.Millisecond, Clock: clk})
		defer s.Close()
		// Recovery fsynced at open: the next fsync is due an interval
		// later, which only comes when the test moves the clock.
		for i := range 5 {
			if err := s.Append(context.Background(), testEvent(t, i)); err != nil {
				t.Fatal(err)
			}
		}
		if got := s.Stats().Synced; got >= 5 {
			t.Fatalf("synced = %d before the interval passed, want < 5 (append must not wait for the fsync)", got)
		}
		if n := len(readAll(t, s, 1)); n >= 5 {
			t.Fatalf("the shipper could read %d events not yet fsynced", n)
		}
		deadline := time.Now().Add(10 * time.Second)
		for s.Stats().Synced < 5 {
			if time.Now().After(deadline) {
				t.Fatalf("background fsync never covered the appends: %+v", s.Stats())
			}
			clk.Advance(10 * time.Millisecond)
			time.Sleep(time.Millisecond)
		}
	})
	t.Run(string(DurabilityPerEvent), func(t *testing.T) {
		s := openTest(t, SpoolOptions{Dir: t.TempDir(), Durability: DurabilityPerEvent})
		defer s.Close()
		var wg sync.WaitGroup
		errs := make(chan error, 8*50)
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 50 {
					ev := testEvent(t, g*1000+i)
					if err := s.Append(context.Background(), ev); err != nil {
						errs <- err
						return
					}
					if got := s.Stats().Synced; got < ev.Seq {
						errs <- fmt.Errorf("append of seq %d returned with synced = %d", ev.Seq, got)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		var m dto.Metric
		if err := s.m.fsyncs.Write(&m); err != nil {
			t.Fatal(err)
		}
		// Eight appenders waiting at once share fsyncs (group commit).
		if n := m.GetHistogram().GetSampleCount(); n >= 400 {
			t.Fatalf("%d fsyncs for 400 concurrent appends: waiters do not share fsyncs", n)
		}
	})
}

// TestSpoolRecordBufferReuse: records are built in a buffer kept between
// appends; events of very different sizes in a row (one past the kept
// bound) each read back whole, with the hash Append gave them.
func TestSpoolRecordBufferReuse(t *testing.T) {
	s := openTest(t, SpoolOptions{Dir: t.TempDir()})
	defer s.Close()
	var want []Hash
	for i, size := range []int{0, 3000, 10, 200 << 10, 5, 70 << 10, 1} {
		ev := testEvent(t, i)
		if err := ev.SetAttributes(map[string]any{"pad": strings.Repeat("x", size)}); err != nil {
			t.Fatal(err)
		}
		if err := s.Append(context.Background(), ev); err != nil {
			t.Fatal(err)
		}
		if ev.Hash != ev.ComputeHash() {
			t.Fatalf("event %d: Hash is not the hash of its encoding", i)
		}
		want = append(want, ev.Hash)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, s, 1)
	if len(got) != len(want) {
		t.Fatalf("read %d events, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i].Hash != want[i] {
			t.Fatalf("event %d read back with another hash", i+1)
		}
	}
}

// TestSpoolReadBatchRecordsLargerThanAChunk reads small records around
// ones larger than a reader's usual buffer, within one segment, and checks
// that the buffer grown for them is not kept.
func TestSpoolReadBatchRecordsLargerThanAChunk(t *testing.T) {
	s := openTest(t, SpoolOptions{Dir: t.TempDir(), SegmentBytes: 8 << 20})
	sizes := []int{0, readChunk - 100, 0, 3 * readChunk, 0, 0, readChunk + 1, 0}
	for i, n := range sizes {
		ev := testEvent(t, i)
		ev.Attributes = []byte(`{"pad":"` + strings.Repeat("x", n) + `"}`)
		if err := s.Append(context.Background(), ev); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, s, 1)
	if len(got) != len(sizes) {
		t.Fatalf("read %d events, want %d", len(got), len(sizes))
	}
	for i, ev := range got {
		if want := len(`{"pad":""}`) + sizes[i]; len(ev.Attributes) != want {
			t.Fatalf("event %d: %d bytes of attributes, want %d", i, len(ev.Attributes), want)
		}
	}
	var r Reader
	defer r.Close()
	if _, err := s.ReadBatch(&r, 1, 100, 16<<20); err != nil {
		t.Fatal(err)
	}
	if cap(r.buf) > readChunk {
		t.Fatalf("reader kept a %d-byte buffer, want at most %d", cap(r.buf), readChunk)
	}
}

// TestSpoolAckFileWrites checks that acknowledgements within
// ackWriteEvery of the last write leave the acked file for later (the
// next one after the interval, or Close, writes the latest), and that one
// after the interval writes it at once.
func TestSpoolAckFileWrites(t *testing.T) {
	dir := t.TempDir()
	clk := clockwork.NewFakeClock()
	s := openTest(t, SpoolOptions{Dir: dir, Clock: clk})
	for i := range 10 {
		if err := s.Append(context.Background(), testEvent(t, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	onDisk := func() string {
		b, err := os.ReadFile(filepath.Join(dir, "acked"))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	clk.Advance(time.Second)
	steps := []struct {
		seq     uint64
		advance time.Duration
		want    string
	}{
		{2, 0, "2"},                 // the first in a while: written
		{3, 0, "2"},                 // within the interval: later
		{4, ackWriteEvery / 2, "2"}, // still within it
		{5, ackWriteEvery, "5"},     // past it: written
	}
	for _, st := range steps {
		clk.Advance(st.advance)
		if err := s.Ack(st.seq); err != nil {
			t.Fatal(err)
		}
		if got := onDisk(); got != st.want {
			t.Fatalf("after ack %d: acked file says %s, want %s", st.seq, got, st.want)
		}
	}
	if err := s.Ack(7); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := onDisk(); got != "7" {
		t.Fatalf("after Close: acked file says %s, want 7", got)
	}
}

// ReadFramed gives what EncodeBatch makes of ReadBatch's answer, across
// segment boundaries, appended to what dst held, and stops at the same
// bounds.
func TestSpoolReadFramedIsEncodeBatch(t *testing.T) {
	s := openTest(t, SpoolOptions{Dir: t.TempDir(), SegmentBytes: 4 << 10})
	defer s.Close()
	for i := range 40 {
		if err := s.Append(context.Background(), testEvent(t, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Segments < 3 {
		t.Fatalf("want several segments: %+v", st)
	}
	for _, c := range []struct {
		from            uint64
		events, maxSize int
	}{{1, 100, 1 << 20}, {5, 7, 1 << 20}, {3, 100, 2000}, {38, 100, 1 << 20}, {41, 100, 1 << 20}} {
		var r1, r2 Reader
		want, err := s.ReadBatch(&r1, c.from, c.events, c.maxSize)
		if err != nil {
			t.Fatal(err)
		}
		got, n, err := s.ReadFramed(&r2, c.from, c.events, c.maxSize, []byte("prefix"))
		if err != nil {
			t.Fatal(err)
		}
		r1.Close()
		r2.Close()
		if n != len(want) || string(got) != "prefix"+string(EncodeBatch(want)) {
			t.Fatalf("from %d, %d events, %d bytes: ReadFramed gave %d events, %d bytes; ReadBatch %d events, %d bytes encoded",
				c.from, c.events, c.maxSize, n, len(got)-len("prefix"), len(want), len(EncodeBatch(want)))
		}
	}
}
