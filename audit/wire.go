package audit

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The collector's gRPC service is small enough to describe by hand on
// protobuf's well-known wrapper types, which keeps it free of generated
// code: Ship takes a BytesValue holding a batch (EncodeBatch) and answers
// a UInt64Value, the sequence number of the last event of the batch, once
// the whole batch is committed.
const (
	CollectorService = "writ.audit.v1.Collector"
	shipMethod       = "/" + CollectorService + "/Ship"
	// MaxBatchBytes bounds a batch's encoding, under gRPC's 4 MiB message
	// limit that writd's server applies.
	MaxBatchBytes = 3 << 20
	// MaxBatchEvents bounds the events in one batch.
	MaxBatchEvents = 20000
)

// CollectorServer is the server side of the collector service.
type CollectorServer interface {
	Ship(ctx context.Context, batch *wrapperspb.BytesValue) (*wrapperspb.UInt64Value, error)
}

// RegisterCollector adds srv to s.
func RegisterCollector(s grpc.ServiceRegistrar, srv CollectorServer) {
	s.RegisterService(&collectorDesc, srv)
}

var collectorDesc = grpc.ServiceDesc{
	ServiceName: CollectorService,
	HandlerType: (*CollectorServer)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Ship",
		Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.BytesValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			if interceptor == nil {
				return srv.(CollectorServer).Ship(ctx, in)
			}
			info := &grpc.UnaryServerInfo{Server: srv, FullMethod: shipMethod}
			return interceptor(ctx, in, info, func(ctx context.Context, req any) (any, error) {
				return srv.(CollectorServer).Ship(ctx, req.(*wrapperspb.BytesValue))
			})
		},
	}},
	Metadata: "writ/audit/collector",
}

// ship calls the collector with an encoded batch (EncodeBatch's form).
// The batch goes on the wire as the BytesValue the collector decodes, but
// without being copied into a gRPC buffer (shipCodec): batch must not
// change until ship returns, and after a failed call, not at all (the
// transport may still hold it).
func ship(ctx context.Context, conn grpc.ClientConnInterface, batch []byte) (uint64, error) {
	out := new(wrapperspb.UInt64Value)
	if err := conn.Invoke(ctx, shipMethod, &rawBatch{batch}, out, grpc.ForceCodecV2(shipCodec{})); err != nil {
		return 0, err
	}
	return out.GetValue(), nil
}

// rawBatch is a Ship request whose BytesValue is marshalled by shipCodec.
type rawBatch struct{ b []byte }

// shipCodec is gRPC's proto codec, except that it marshals a rawBatch as
// a BytesValue (field 1, bytes) whose value is the caller's slice itself:
// the proto codec would copy a batch of up to MaxBatchBytes into a pooled
// buffer (1 MiB for any batch from 32 KiB), which the pool then keeps.
type shipCodec struct{}

var protoCodec = encoding.GetCodecV2(grpcproto.Name)

func (shipCodec) Name() string { return grpcproto.Name }

func (shipCodec) Marshal(v any) (mem.BufferSlice, error) {
	rb, ok := v.(*rawBatch)
	if !ok {
		return protoCodec.Marshal(v)
	}
	hdr := protowire.AppendVarint(protowire.AppendTag(make([]byte, 0, 8), 1, protowire.BytesType), uint64(len(rb.b)))
	return mem.BufferSlice{mem.SliceBuffer(hdr), mem.SliceBuffer(rb.b)}, nil
}

func (shipCodec) Unmarshal(data mem.BufferSlice, v any) error { return protoCodec.Unmarshal(data, v) }

// EncodeBatch frames encoded events (Marshal form) for Ship: each is a
// big-endian uint32 length followed by the bytes.
func EncodeBatch(evs [][]byte) []byte {
	n := 0
	for _, e := range evs {
		n += 4 + len(e)
	}
	b := make([]byte, 0, n)
	for _, e := range evs {
		b = binary.BigEndian.AppendUint32(b, uint32(len(e)))
		b = append(b, e...)
	}
	return b
}

// DecodeBatch splits a batch and decodes every event, checking each one's
// hash.
func DecodeBatch(b []byte) ([]Event, error) {
	if len(b) > MaxBatchBytes {
		return nil, fmt.Errorf("batch of %d bytes is over %d", len(b), MaxBatchBytes)
	}
	var out []Event
	for len(b) > 0 {
		if len(b) < 4 {
			return nil, errors.New("batch: truncated length")
		}
		n := int(binary.BigEndian.Uint32(b))
		b = b[4:]
		if n > len(b) || n > MaxRecordBytes {
			return nil, errors.New("batch: truncated event")
		}
		ev, err := Unmarshal(b[:n])
		if err != nil {
			return nil, fmt.Errorf("batch event %d: %w", len(out), err)
		}
		out = append(out, ev)
		if len(out) > MaxBatchEvents {
			return nil, fmt.Errorf("batch holds more than %d events", MaxBatchEvents)
		}
		b = b[n:]
	}
	return out, nil
}
