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

// wireField is one field: its tag and, for a length-delimited field, its
// bytes, or for a varint, its value.
type wireField struct {
	num protowire.Number
	typ protowire.Type
	val []byte
	u   uint64
}

// fields reads the fields of one message in order, as bufio.Scanner
// reads lines: each decoder keeps only its switch on the field number.
// It is a plain loop, not an iterator or a callback, because the
// closure call per field made decoding measurably slower.
type fields struct {
	b []byte
	// once has the bit (num%64) of each message field that may come only
	// once: a second one is refused, since proto.Unmarshal would merge
	// the two. Every decoder refuses unknown fields, whatever bit they
	// share.
	once, seen uint64
	f          wireField
	err        error
}

// next reads the next field into f. It returns false at the end of the
// message, or with err set on a field that is malformed, of a wire type
// other than bytes and varint (no field decoded here has one), or
// repeated against once.
func (r *fields) next() bool {
	if len(r.b) == 0 {
		return false
	}
	num, typ, n := protowire.ConsumeTag(r.b)
	if n < 0 {
		return r.fail()
	}
	if bit := uint64(1) << (uint(num) % 64); r.once&bit != 0 {
		if r.seen&bit != 0 {
			return r.fail()
		}
		r.seen |= bit
	}
	r.f = wireField{num: num, typ: typ}
	var m int
	switch typ {
	case protowire.BytesType:
		r.f.val, m = protowire.ConsumeBytes(r.b[n:])
	case protowire.VarintType:
		r.f.u, m = protowire.ConsumeVarint(r.b[n:])
	default:
		return r.fail()
	}
	if m < 0 {
		return r.fail()
	}
	r.b = r.b[n+m:]
	return true
}

func (r *fields) fail() bool {
	r.err = errFallback
	return false
}

func str(f wireField) (string, error) {
	if f.typ != protowire.BytesType || !utf8.Valid(f.val) {
		return "", errFallback
	}
	return string(f.val), nil
}

func decodeCheckRequest(b []byte, req *authv3.CheckRequest) error {
	r := fields{b: b, once: 1 << 1}
	for r.next() {
		if r.f.num != 1 || r.f.typ != protowire.BytesType {
			return errFallback
		}
		req.Attributes = &authv3.AttributeContext{}
		if err := decodeAttributes(r.f.val, req.Attributes); err != nil {
			return err
		}
	}
	return r.err
}

func decodeAttributes(b []byte, a *authv3.AttributeContext) error {
	r := fields{b: b, once: 1<<1 | 1<<2 | 1<<4 | 1<<11 | 1<<12 | 1<<13}
	for r.next() {
		f := r.f
		if f.typ != protowire.BytesType {
			return errFallback
		}
		var err error
		switch f.num {
		case 1, 2:
			p := &authv3.AttributeContext_Peer{}
			if f.num == 1 {
				a.Source = p
			} else {
				a.Destination = p
			}
			err = decodePeer(f.val, p)
		case 4:
			a.Request = &authv3.AttributeContext_Request{}
			err = decodeRequest(f.val, a.Request)
		case 10:
			if a.ContextExtensions == nil {
				a.ContextExtensions = map[string]string{}
			}
			err = decodeMapEntry(f.val, a.ContextExtensions)
		// Rarer messages, as Envoy sends them (often empty): left to
		// proto.Unmarshal.
		case 11:
			a.MetadataContext = &corev3.Metadata{}
			err = proto.Unmarshal(f.val, a.MetadataContext)
		case 12:
			a.TlsSession = &authv3.AttributeContext_TLSSession{}
			err = proto.Unmarshal(f.val, a.TlsSession)
		case 13:
			a.RouteMetadataContext = &corev3.Metadata{}
			err = proto.Unmarshal(f.val, a.RouteMetadataContext)
		default:
			return errFallback
		}
		if err != nil {
			return err
		}
	}
	return r.err
}

func decodePeer(b []byte, p *authv3.AttributeContext_Peer) error {
	r := fields{b: b, once: 1 << 1}
	for r.next() {
		f := r.f
		var err error
		switch f.num {
		case 1:
			if f.typ != protowire.BytesType {
				return errFallback
			}
			p.Address = &corev3.Address{}
			err = decodeAddress(f.val, p.Address)
		case 2:
			p.Service, err = str(f)
		case 3:
			if f.typ != protowire.BytesType {
				return errFallback
			}
			if p.Labels == nil {
				p.Labels = map[string]string{}
			}
			err = decodeMapEntry(f.val, p.Labels)
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
	return r.err
}

// decodeAddress decodes the socket address Envoy gives its peers;
// proto.Unmarshal went through reflection for it, twice per check. Pipes
// and internal addresses fall back.
func decodeAddress(b []byte, a *corev3.Address) error {
	r := fields{b: b, once: 1 << 1}
	for r.next() {
		if r.f.num != 1 || r.f.typ != protowire.BytesType {
			return errFallback
		}
		sa := &corev3.SocketAddress{}
		if err := decodeSocketAddress(r.f.val, sa); err != nil {
			return err
		}
		a.Address = &corev3.Address_SocketAddress{SocketAddress: sa}
	}
	return r.err
}

func decodeSocketAddress(b []byte, sa *corev3.SocketAddress) error {
	// A repeated field is rare and has oneof and merge rules of its own:
	// proto.Unmarshal decides.
	r := fields{b: b, once: 1<<1 | 1<<2 | 1<<3 | 1<<6}
	for r.next() {
		f := r.f
		// Every field but the address (str checks its type) is a varint.
		if f.typ != protowire.VarintType && f.num != 2 {
			return errFallback
		}
		var err error
		switch f.num {
		case 1:
			sa.Protocol = corev3.SocketAddress_Protocol(int32(f.u))
		case 2:
			sa.Address, err = str(f)
		case 3:
			// A second port was refused, and a named port (4) falls
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
	return r.err
}

// decodeTimestamp decodes the request time Envoy sends with every check.
func decodeTimestamp(b []byte, ts *timestamppb.Timestamp) error {
	r := fields{b: b, once: 1<<1 | 1<<2}
	for r.next() {
		if r.f.typ != protowire.VarintType {
			return errFallback
		}
		switch r.f.num {
		case 1:
			ts.Seconds = int64(r.f.u)
		case 2:
			ts.Nanos = int32(r.f.u)
		default:
			return errFallback
		}
	}
	return r.err
}

func decodeRequest(b []byte, req *authv3.AttributeContext_Request) error {
	r := fields{b: b, once: 1<<1 | 1<<2}
	for r.next() {
		f := r.f
		if f.typ != protowire.BytesType {
			return errFallback
		}
		var err error
		switch f.num {
		case 1:
			req.Time = &timestamppb.Timestamp{}
			err = decodeTimestamp(f.val, req.Time)
		case 2:
			req.Http = &authv3.AttributeContext_HttpRequest{}
			err = decodeHTTP(f.val, req.Http)
		default:
			return errFallback
		}
		if err != nil {
			return err
		}
	}
	return r.err
}

func decodeHTTP(b []byte, h *authv3.AttributeContext_HttpRequest) error {
	r := fields{b: b, once: 1 << 13}
	for r.next() {
		f := r.f
		var err error
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
			err = decodeMapEntry(f.val, h.Headers)
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
			if f.typ != protowire.BytesType {
				return errFallback
			}
			h.HeaderMap = &corev3.HeaderMap{}
			err = proto.Unmarshal(f.val, h.HeaderMap)
		default:
			return errFallback
		}
		if err != nil {
			return err
		}
	}
	return r.err
}

// decodeMapEntry decodes one map<string, string> entry into m; a missing
// key or value is "", and a later entry replaces an earlier one, as
// proto.Unmarshal does.
func decodeMapEntry(b []byte, m map[string]string) error {
	var k, v string
	r := fields{b: b}
	for r.next() {
		var err error
		switch r.f.num {
		case 1:
			k, err = str(r.f)
		case 2:
			v, err = str(r.f)
		default:
			return errFallback
		}
		if err != nil {
			return err
		}
	}
	if r.err != nil {
		return r.err
	}
	m[k] = v
	return nil
}
