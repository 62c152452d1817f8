package enforcer

import (
	"syscall"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

func fastDecodeCorpus() []*authv3.CheckRequest {
	reqs := variedRequests(300)
	for _, r := range goldenRequests() {
		reqs = append(reqs, r)
	}
	reqs = append(reqs, benchRequests(50, true)...)
	return reqs
}

// checkSameDecode fails unless Codec decodes b into the message
// proto.Unmarshal gives, or both refuse it.
func checkSameDecode(t *testing.T, b []byte) {
	t.Helper()
	var want authv3.CheckRequest
	werr := proto.Unmarshal(b, &want)
	var got authv3.CheckRequest
	gerr := Codec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, &got)
	if (werr == nil) != (gerr == nil) {
		t.Fatalf("codec error %v, proto.Unmarshal error %v", gerr, werr)
	}
	if werr == nil && !proto.Equal(&got, &want) {
		t.Fatalf("codec decoded %v\nproto.Unmarshal %v", &got, &want)
	}
}

// TestFastDecodeMatchesProto: the hand decoder gives proto.Unmarshal's
// message for recorded, generated and benchmark requests, and for the
// encodings it leaves to proto.Unmarshal (repeated messages, unknown
// fields, invalid UTF-8, truncation).
func TestFastDecodeMatchesProto(t *testing.T) {
	var fastPath int
	for _, req := range fastDecodeCorpus() {
		b, err := proto.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		checkSameDecode(t, b)
		var fast authv3.CheckRequest
		if decodeCheckRequest(b, &fast) == nil {
			fastPath++
		}
	}
	t.Logf("%d of %d requests took the hand decoder", fastPath, len(fastDecodeCorpus()))
	// Requests as Envoy sends them must not fall back.
	for name, req := range goldenRequests() {
		b, _ := proto.Marshal(req)
		if err := decodeCheckRequest(b, &authv3.CheckRequest{}); err != nil {
			t.Errorf("%s fell back to proto.Unmarshal", name)
		}
	}
	base, _ := proto.Marshal(goldenRequests()["http1_mtls_json_body"])
	attrs := func(inner []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), inner)
	}
	varint := func(b []byte, num protowire.Number, v uint64) []byte {
		return protowire.AppendVarint(protowire.AppendTag(b, num, protowire.VarintType), v)
	}
	sockAddr := func(inner []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), inner)
	}
	addr := func(inner []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), inner)
	}
	source := func(address []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), address)
	}
	tricky := map[string][]byte{
		"attributes twice (merged)": append(append([]byte{}, base...), base...),
		"unknown top-level field":   protowire.AppendVarint(protowire.AppendTag(append([]byte{}, base...), 99, protowire.VarintType), 7),
		"invalid UTF-8 in a header": attrs(protowire.AppendBytes(protowire.AppendTag(nil, 4, protowire.BytesType),
			protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType),
				protowire.AppendBytes(protowire.AppendTag(nil, 3, protowire.BytesType),
					protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), []byte{0xff}))))),
		"map entry without value": attrs(protowire.AppendBytes(protowire.AppendTag(nil, 10, protowire.BytesType),
			protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "k"))),
		"truncated": base[:len(base)-3],
		// Peer addresses (Attributes.source.address) and the request time
		// in the encodings the hand decoder refuses or must get right.
		"pipe address":           attrs(source(addr(protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "/run/x.sock"))))),
		"named port":             attrs(source(addr(sockAddr(protowire.AppendString(protowire.AppendTag(nil, 4, protowire.BytesType), "http"))))),
		"port twice":             attrs(source(addr(sockAddr(varint(varint(nil, 3, 80), 3, 8080))))),
		"udp, ipv4 compat, port": attrs(source(addr(sockAddr(varint(varint(varint(protowire.AppendString(protowire.AppendTag(nil, 2, protowire.BytesType), "::1"), 1, 1), 6, 1), 3, 1<<33+5))))),
		"negative protocol":      attrs(source(addr(sockAddr(varint(nil, 1, uint64(1<<64-3)))))),
		"resolver name":          attrs(source(addr(sockAddr(protowire.AppendString(protowire.AppendTag(nil, 5, protowire.BytesType), "dns"))))),
		"socket address twice":   attrs(source(addr(append(sockAddr(varint(nil, 3, 1)), sockAddr(varint(nil, 1, 1))...)))),
		"empty address":          attrs(source(addr(nil))),
		"request time":           attrs(protowire.AppendBytes(protowire.AppendTag(nil, 4, protowire.BytesType), protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), varint(varint(nil, 1, uint64(1<<64-7)), 2, 1<<40+9)))),
		"request time twice":     attrs(protowire.AppendBytes(protowire.AppendTag(nil, 4, protowire.BytesType), protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), varint(varint(nil, 1, 5), 1, 6)))),
		"request time, unknown":  attrs(protowire.AppendBytes(protowire.AppendTag(nil, 4, protowire.BytesType), protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), varint(nil, 3, 5)))),
		"empty":                  nil,
	}
	for name, b := range tricky {
		t.Run(name, func(t *testing.T) { checkSameDecode(t, b) })
	}
}

// TestCodecSharedResponses: the pre-encoded boolean responses decode to
// the responses they stand for, and other responses are encoded as usual.
func TestCodecSharedResponses(t *testing.T) {
	c := Codec()
	for _, o := range []outcome{plainAllow, plainDeny, denyOutcome(418, 7, nil, "tea", nil)} {
		bs, err := c.Marshal(o.resp)
		if err != nil {
			t.Fatal(err)
		}
		var got authv3.CheckResponse
		if err := proto.Unmarshal(bs.Materialize(), &got); err != nil || !proto.Equal(&got, o.resp) {
			t.Fatalf("response %v came back as %v (%v)", o.resp, &got, err)
		}
	}
}

// FuzzFastDecode: no input decodes differently from proto.Unmarshal.
func FuzzFastDecode(f *testing.F) {
	for _, req := range fastDecodeCorpus()[:40] {
		b, _ := proto.Marshal(req)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { checkSameDecode(t, b) })
}

// BenchmarkDecodeCheckRequest compares the server codec with
// proto.Unmarshal on the benchmark's requests.
func BenchmarkDecodeCheckRequest(b *testing.B) {
	var wire [][]byte
	for _, r := range benchRequests(256, true) {
		bs, _ := proto.Marshal(r)
		wire = append(wire, bs)
	}
	b.Run("proto.Unmarshal", func(b *testing.B) {
		b.ReportAllocs()
		defer reportCPU(b)()
		for i := 0; i < b.N; i++ {
			var req authv3.CheckRequest
			if err := proto.Unmarshal(wire[i%len(wire)], &req); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("codec", func(b *testing.B) {
		c := Codec()
		b.ReportAllocs()
		defer reportCPU(b)()
		for i := 0; i < b.N; i++ {
			var req authv3.CheckRequest
			if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(wire[i%len(wire)])}, &req); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// reportCPU reports the process's CPU time per operation, which other
// work on a shared machine disturbs far less than wall time.
func reportCPU(b *testing.B) func() {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	return func() { b.ReportMetric(float64((cpu()-start).Nanoseconds())/float64(b.N), "cpu-ns/op") }
}
