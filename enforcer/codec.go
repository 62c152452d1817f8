package enforcer

import (
	"errors"
	"sync"
	"unicode/utf8"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Codec is the server codec of the ext_authz service: gRPC's proto codec,
// except that CheckRequests are decoded by hand. protobuf-go decodes
// string maps (the request headers) through reflection, which made
// decoding the largest single cost of a check after TLS. The hand decoder
// covers the fields Envoy sends; for anything else (an unknown or repeated
// field, a field of a type it does not decode) it hands the whole message
// to proto.Unmarshal, so the result is always the message proto.Unmarshal
// would give (TestFastDecodeMatchesProto). Safe for concurrent use.
func Codec() encoding.CodecV2 { return codec{encoding.GetCodecV2(grpcproto.Name)} }

type codec struct{ encoding.CodecV2 }

// Marshal sends the shared responses of boolean decisions as bytes
// encoded once; anything else goes through the proto codec.
func (c codec) Marshal(v any) (mem.BufferSlice, error) {
	switch v {
	case plainAllow.resp:
		return mem.BufferSlice{mem.SliceBuffer(plainWire().allow)}, nil
	case plainDeny.resp:
		return mem.BufferSlice{mem.SliceBuffer(plainWire().deny)}, nil
	}
	return c.CodecV2.Marshal(v)
}

// plainWire is the wire form of the shared responses; gRPC only reads
// them. It is made on first use, not at package init: marshalling
// initializes protobuf's reflection over the whole ext_authz file and
// its imports (~100 KiB of heap kept for good), which only the ext_authz
// server needs, not every writ-proxy that links this package.
var plainWire = sync.OnceValue(func() struct{ allow, deny []byte } {
	return struct{ allow, deny []byte }{mustMarshal(plainAllow.resp), mustMarshal(plainDeny.resp)}
})

func mustMarshal(m proto.Message) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

func (c codec) Unmarshal(data mem.BufferSlice, v any) error {
	req, ok := v.(*authv3.CheckRequest)
	if !ok {
		return c.CodecV2.Unmarshal(data, v)
	}
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	return unmarshalCheckRequest(buf.ReadOnlyData(), req)
}

// errFallback sends a message to proto.Unmarshal.
var errFallback = errors.New("fall back to proto.Unmarshal")

// unmarshalCheckRequest is proto.Unmarshal for a CheckRequest. The hand
// decoder fills a fresh message, so that a fallback part way through
// starts again from the untouched req.
func unmarshalCheckRequest(b []byte, req *authv3.CheckRequest) error {
	if req.Attributes == nil && len(req.ProtoReflect().GetUnknown()) == 0 {
		var fast authv3.CheckRequest
		if err := decodeCheckRequest(b, &fast); err == nil {
			req.Attributes = fast.Attributes
			return nil
		}
	}
	return proto.Unmarshal(b, req)
}

// field reads one field's tag and, for length-delimited fields, its
// bytes; other wire types are refused (no field decoded here has one,
// save HttpRequest.size, handled by its caller).
type wireField struct {
	num protowire.Number
	typ protowire.Type
	val []byte
	u   uint64
}

func nextField(b []byte) (wireField, int, error) {
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 {
		return wireField{}, 0, errFallback
	}
	f := wireField{num: num, typ: typ}
	switch typ {
	case protowire.BytesType:
		v, m := protowire.ConsumeBytes(b[n:])
		if m < 0 {
			return wireField{}, 0, errFallback
		}
		f.val = v
		return f, n + m, nil
	case protowire.VarintType:
		v, m := protowire.ConsumeVarint(b[n:])
		if m < 0 {
			return wireField{}, 0, errFallback
		}
		f.u = v
		return f, n + m, nil
	}
	return wireField{}, 0, errFallback
}

func str(f wireField) (string, error) {
	if f.typ != protowire.BytesType || !utf8.Valid(f.val) {
		return "", errFallback
	}
	return string(f.val), nil
}

// once refuses a second occurrence of a message field, which
// proto.Unmarshal would merge.
func once(seen *uint64, num protowire.Number) error {
	bit := uint64(1) << (uint(num) % 64)
	if *seen&bit != 0 {
		return errFallback
	}
	*seen |= bit
	return nil
}

func decodeCheckRequest(b []byte, req *authv3.CheckRequest) error {
	var seen uint64
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		if f.num != 1 || f.typ != protowire.BytesType {
			return errFallback
		}
		if err := once(&seen, f.num); err != nil {
			return err
		}
		req.Attributes = &authv3.AttributeContext{}
		if err := decodeAttributes(f.val, req.Attributes); err != nil {
			return err
		}
	}
	return nil
}

func decodeAttributes(b []byte, a *authv3.AttributeContext) error {
	var seen uint64
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		if f.typ != protowire.BytesType {
			return errFallback
		}
		switch f.num {
		case 1, 2:
			if err := once(&seen, f.num); err != nil {
				return err
			}
			p := &authv3.AttributeContext_Peer{}
			if f.num == 1 {
				a.Source = p
			} else {
				a.Destination = p
			}
			if err := decodePeer(f.val, p); err != nil {
				return err
			}
			continue
		case 4:
			if err := once(&seen, f.num); err != nil {
				return err
			}
			a.Request = &authv3.AttributeContext_Request{}
			if err := decodeRequest(f.val, a.Request); err != nil {
				return err
			}
			continue
		case 10:
			if a.ContextExtensions == nil {
				a.ContextExtensions = map[string]string{}
			}
			if err := decodeMapEntry(f.val, a.ContextExtensions); err != nil {
				return err
			}
			continue
		case 11, 12, 13:
			// Rarer messages, as Envoy sends them (often empty): left to
			// proto.Unmarshal, one message each.
			if err := once(&seen, f.num); err != nil {
				return err
			}
			var m proto.Message
			switch f.num {
			case 11:
				a.MetadataContext = &corev3.Metadata{}
				m = a.MetadataContext
			case 12:
				a.TlsSession = &authv3.AttributeContext_TLSSession{}
				m = a.TlsSession
			default:
				a.RouteMetadataContext = &corev3.Metadata{}
				m = a.RouteMetadataContext
			}
			if err := proto.Unmarshal(f.val, m); err != nil {
				return err
			}
			continue
		}
		return errFallback
	}
	return nil
}

func decodePeer(b []byte, p *authv3.AttributeContext_Peer) error {
	var seen uint64
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		switch f.num {
		case 1:
			if err := once(&seen, f.num); err != nil || f.typ != protowire.BytesType {
				return errFallback
			}
			p.Address = &corev3.Address{}
			if err := decodeAddress(f.val, p.Address); err != nil {
				return err
			}
			continue
		case 2:
			p.Service, err = str(f)
		case 3:
			if f.typ != protowire.BytesType {
				return errFallback
			}
			if p.Labels == nil {
				p.Labels = map[string]string{}
			}
			if err := decodeMapEntry(f.val, p.Labels); err != nil {
				return err
			}
			continue
		case 4:
			p.Principal, err = str(f)
		case 5:
			p.Certificate, err = str(f)
		default:
			return errFallback
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// decodeAddress decodes the socket address Envoy gives its peers;
// proto.Unmarshal went through reflection for it, twice per check. Pipes
// and internal addresses fall back.
func decodeAddress(b []byte, a *corev3.Address) error {
	var seen uint64
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		if f.num != 1 || f.typ != protowire.BytesType {
			return errFallback
		}
		if err := once(&seen, f.num); err != nil {
			return err
		}
		sa := &corev3.SocketAddress{}
		if err := decodeSocketAddress(f.val, sa); err != nil {
			return err
		}
		a.Address = &corev3.Address_SocketAddress{SocketAddress: sa}
	}
	return nil
}

func decodeSocketAddress(b []byte, sa *corev3.SocketAddress) error {
	var seen uint64
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		// A repeated field is rare and has oneof and merge rules of its
		// own: proto.Unmarshal decides.
		if err := once(&seen, f.num); err != nil {
			return err
		}
		// Every field but the address (str checks its type) is a varint.
		if f.typ != protowire.VarintType && f.num != 2 {
			return errFallback
		}
		switch f.num {
		case 1:
			sa.Protocol = corev3.SocketAddress_Protocol(int32(f.u))
		case 2:
			sa.Address, err = str(f)
		case 3:
			// once refused a second port, and a named port (4) falls
			// back, so the oneof is still unset here.
			sa.PortSpecifier = &corev3.SocketAddress_PortValue{PortValue: uint32(f.u)}
		case 6:
			sa.Ipv4Compat = f.u != 0
		default:
			return errFallback
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// decodeTimestamp decodes the request time Envoy sends with every check.
func decodeTimestamp(b []byte, ts *timestamppb.Timestamp) error {
	var seen uint64
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		if f.typ != protowire.VarintType {
			return errFallback
		}
		if err := once(&seen, f.num); err != nil {
			return err
		}
		switch f.num {
		case 1:
			ts.Seconds = int64(f.u)
		case 2:
			ts.Nanos = int32(f.u)
		default:
			return errFallback
		}
	}
	return nil
}

func decodeRequest(b []byte, r *authv3.AttributeContext_Request) error {
	var seen uint64
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		if f.typ != protowire.BytesType {
			return errFallback
		}
		if err := once(&seen, f.num); err != nil {
			return err
		}
		switch f.num {
		case 1:
			r.Time = &timestamppb.Timestamp{}
			if err := decodeTimestamp(f.val, r.Time); err != nil {
				return err
			}
			continue
		case 2:
			r.Http = &authv3.AttributeContext_HttpRequest{}
			if err := decodeHTTP(f.val, r.Http); err != nil {
				return err
			}
			continue
		}
		return errFallback
	}
	return nil
}

func decodeHTTP(b []byte, h *authv3.AttributeContext_HttpRequest) error {
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		switch f.num {
		case 1:
			h.Id, err = str(f)
		case 2:
			h.Method, err = str(f)
		case 3:
			if f.typ != protowire.BytesType {
				return errFallback
			}
			if h.Headers == nil {
				h.Headers = make(map[string]string, 8)
			}
			if err := decodeMapEntry(f.val, h.Headers); err != nil {
				return err
			}
			continue
		case 4:
			h.Path, err = str(f)
		case 5:
			h.Host, err = str(f)
		case 6:
			h.Scheme, err = str(f)
		case 7:
			h.Query, err = str(f)
		case 8:
			h.Fragment, err = str(f)
		case 9:
			if f.typ != protowire.VarintType {
				return errFallback
			}
			h.Size = int64(f.u)
		case 10:
			h.Protocol, err = str(f)
		case 11:
			h.Body, err = str(f)
		case 12:
			if f.typ != protowire.BytesType {
				return errFallback
			}
			h.RawBody = append([]byte{}, f.val...)
		case 13:
			if f.typ != protowire.BytesType || h.HeaderMap != nil {
				return errFallback
			}
			h.HeaderMap = &corev3.HeaderMap{}
			if err := proto.Unmarshal(f.val, h.HeaderMap); err != nil {
				return err
			}
			continue
		default:
			return errFallback
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// decodeMapEntry decodes one map<string, string> entry into m; a missing
// key or value is "", and a later entry replaces an earlier one, as
// proto.Unmarshal does.
func decodeMapEntry(b []byte, m map[string]string) error {
	var k, v string
	for len(b) > 0 {
		f, n, err := nextField(b)
		if err != nil {
			return err
		}
		b = b[n:]
		switch f.num {
		case 1:
			k, err = str(f)
		case 2:
			v, err = str(f)
		default:
			return errFallback
		}
		if err != nil {
			return err
		}
	}
	m[k] = v
	return nil
}
