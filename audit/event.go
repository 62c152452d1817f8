// Package audit owns Writ's audit trail: the event model and its canonical
// encoding and hash chain, the local spool written where decisions are made,
// the shipper that streams the spool to writd, and the collector that
// inserts events into PostgreSQL exactly once.
//
// It may import store and config; enforcer imports it (for the sink), and
// api, console, compliance and cmd build on it. docs/audit.md describes the
// encoding, the spool's durability modes and what each can lose.
package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
)

// Kinds of Event. They are a small fixed set so that queries and reports
// can rely on them.
const (
	KindRequest      = "request"       // a request decision by an enforcer
	KindDecisionAPI  = "decision_api"  // an answer of the decision API (AuthZEN, OPA data API)
	KindConfigChange = "config_change" // a configuration change: who, what, diff
	KindPolicyChange = "policy_change" // a policy change: who, what, diff
	KindCertIssued   = "cert_issued"   // a certificate was issued
	KindCertRenewed  = "cert_renewed"  // a certificate was renewed
	KindCertRefused  = "cert_refused"  // a certificate request was refused
	KindLogin        = "login"         // an admin, API or console login, or a node's join-token attestation (successful or not)
	KindAdminCall    = "admin_call"    // a call of writd's admin API, authenticated by peer uid
)

// kinds is the set of valid kinds.
var kinds = map[string]bool{
	KindRequest: true, KindDecisionAPI: true, KindConfigChange: true, KindPolicyChange: true,
	KindCertIssued: true, KindCertRenewed: true, KindCertRefused: true, KindLogin: true, KindAdminCall: true,
}

// HashSize is the size of an event hash (SHA-256).
const HashSize = sha256.Size

// Hash is the SHA-256 of an event's canonical encoding.
type Hash [HashSize]byte

// encodingVersion is the first byte of every canonical encoding.
const encodingVersion = 1

// Event is one audit record. Source, Seq, PrevHash and Hash are set by the
// spool that appends it (they make the per-source hash chain); the rest by
// whoever records it. An Event is a plain value and not safe for concurrent
// mutation.
type Event struct {
	ID   uuid.UUID // UUIDv7: time-ordered
	Time time.Time // UTC, truncated to microseconds (PostgreSQL's precision)
	Kind string    // one of the Kind constants
	// Source is the SPIFFE ID of the component that recorded the event:
	// the owner of the hash chain the event belongs to.
	Source string
	Seq    uint64 // 1, 2, 3, ... per source
	// PrevHash is the Hash of the event with Seq-1 from the same Source
	// (zero for Seq 1, or for the first event after a segment's head).
	PrevHash Hash
	Hash     Hash

	// Principal is who acted: the caller's SPIFFE ID for a request, the
	// administrator for a change or a login, the workload for a
	// certificate.
	Principal string
	// Destination is what was acted on: the called service's SPIFFE ID,
	// the changed resource, the certificate's subject.
	Destination string
	Action      string // HTTP method, "apply", "sign", "login", ...
	Resource    string // request path, resource name, certificate serial, ...
	Result      string // "allow", "deny", "ok", "error", "refused"
	Status      int    // HTTP status or 0
	Reason      string
	Cause       string
	// PolicyRevision is the revision of the policy that decided.
	PolicyRevision string
	TraceID        string
	// Attributes is a JSON object holding the rest, already redacted.
	// The spool canonicalizes it (CanonicalJSON) before hashing unless it
	// was set by SetAttributes and not replaced since.
	Attributes json.RawMessage

	canon json.RawMessage // what SetAttributes produced
}

// SetAttributes sets Attributes to the canonical JSON of attrs, sparing
// the spool a second pass.
func (e *Event) SetAttributes(attrs map[string]any) error {
	raw, err := Attributes(attrs)
	if err != nil {
		return err
	}
	e.Attributes, e.canon = raw, raw
	return nil
}

// attrsCanonical reports whether Attributes is still what SetAttributes
// (or NewEvent) put there.
// SetCanonicalAttributes sets Attributes to the JSON encoding of v without
// the decode and re-encode CanonicalJSON does: the fast path for recorders
// on the request path. v's encoding must already be canonical — object
// keys in sorted order (struct fields declared in key order, maps with
// string keys), no numbers other than integers of magnitude at most 2^53
// — which the caller's tests check against CanonicalJSON. An encoding
// holding a NUL falls back to CanonicalJSON, which removes it.
func (e *Event) SetCanonicalAttributes(v any) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("attributes: %w", err)
	}
	raw := json.RawMessage(bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
	// encoding/json escapes a NUL and writes invalid UTF-8 as an escaped
	// U+FFFD; the canonical form drops the one and spells the other.
	if bytes.Contains(raw, []byte(`\u0000`)) || bytes.Contains(raw, []byte(`\ufffd`)) {
		var err error
		if raw, err = CanonicalJSON(raw); err != nil {
			return err
		}
	}
	e.Attributes, e.canon = raw, raw
	return nil
}

// SetCanonicalRaw sets Attributes to raw, which the caller has encoded
// canonically itself (and whose tests hold it to CanonicalJSON), so the
// spool takes it as is. raw must not change until the event is appended.
func (e *Event) SetCanonicalRaw(raw json.RawMessage) {
	e.Attributes, e.canon = raw, raw
}

func (e *Event) attrsCanonical() bool {
	return len(e.canon) > 0 && len(e.canon) == len(e.Attributes) && &e.canon[0] == &e.Attributes[0]
}

// Canonical returns the bytes the event's hash covers: the fields in a
// fixed order, each length-prefixed, with no maps. docs/audit.md gives the
// layout. Hash itself is not included; PrevHash is.
func (e *Event) Canonical() []byte {
	return e.appendCanonical(make([]byte, 0, 256+len(e.Attributes)))
}

// appendCanonical appends the canonical encoding to b.
func (e *Event) appendCanonical(b []byte) []byte {
	b = append(b, encodingVersion)
	b = append(b, e.ID[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(e.Time.UnixMicro()))
	b = appendString(b, e.Kind)
	b = appendString(b, e.Source)
	b = binary.BigEndian.AppendUint64(b, e.Seq)
	b = append(b, e.PrevHash[:]...)
	b = appendString(b, e.Principal)
	b = appendString(b, e.Destination)
	b = appendString(b, e.Action)
	b = appendString(b, e.Resource)
	b = appendString(b, e.Result)
	b = binary.BigEndian.AppendUint64(b, uint64(int64(e.Status)))
	b = appendString(b, e.Reason)
	b = appendString(b, e.Cause)
	b = appendString(b, e.PolicyRevision)
	b = appendString(b, e.TraceID)
	attrs := e.Attributes
	if len(attrs) == 0 {
		attrs = emptyObject
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(attrs)))
	return append(b, attrs...)
}

// sealInto appends the sealed event's spool and wire form (as Marshal)
// to b, setting Hash, without allocating when b has room: the spool
// builds records in a buffer it reuses.
func (e *Event) sealInto(b []byte) []byte {
	start := len(b)
	b = e.appendCanonical(b)
	e.Hash = sha256.Sum256(b[start:])
	return append(b, e.Hash[:]...)
}

var emptyObject = json.RawMessage("{}")

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// ComputeHash returns the SHA-256 of the canonical encoding.
func (e *Event) ComputeHash() Hash { return sha256.Sum256(e.Canonical()) }

// Seal sets Hash from the other fields.
func (e *Event) Seal() { e.Hash = e.ComputeHash() }

// Marshal returns the spool and wire form of a sealed event: the canonical
// encoding followed by the hash.
func (e *Event) Marshal() []byte {
	b := e.Canonical()
	return append(b, e.Hash[:]...)
}

// Unmarshal decodes the form Marshal produces and checks that the stored
// hash matches the content, so a decoded event is never trusted blindly.
func Unmarshal(b []byte) (Event, error) {
	var e Event
	if len(b) < 1+16+8+HashSize || b[0] != encodingVersion {
		return e, errors.New("decode event: bad version or too short")
	}
	d := decoder{b: b[1:]}
	copy(e.ID[:], d.bytes(16))
	e.Time = time.UnixMicro(int64(d.u64())).UTC()
	e.Kind = d.str()
	e.Source = d.str()
	e.Seq = d.u64()
	copy(e.PrevHash[:], d.bytes(HashSize))
	e.Principal = d.str()
	e.Destination = d.str()
	e.Action = d.str()
	e.Resource = d.str()
	e.Result = d.str()
	e.Status = int(int64(d.u64()))
	e.Reason = d.str()
	e.Cause = d.str()
	e.PolicyRevision = d.str()
	e.TraceID = d.str()
	e.Attributes = json.RawMessage(d.str())
	copy(e.Hash[:], d.bytes(HashSize))
	if d.err != nil {
		return Event{}, fmt.Errorf("decode event: %w", d.err)
	}
	if len(d.b) != 0 {
		return Event{}, fmt.Errorf("decode event: %d trailing bytes", len(d.b))
	}
	// The canonical encoding is exactly the bytes before the hash.
	if sha256.Sum256(b[:len(b)-HashSize]) != e.Hash {
		return Event{}, fmt.Errorf("decode event %s: hash does not match content", e.ID)
	}
	return e, nil
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) bytes(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || len(d.b) < n {
		d.err = errors.New("truncated")
		return nil
	}
	out := d.b[:n]
	d.b = d.b[n:]
	return out
}

func (d *decoder) u64() uint64 {
	b := d.bytes(8)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

func (d *decoder) str() string {
	lb := d.bytes(4)
	if lb == nil {
		return ""
	}
	return string(d.bytes(int(binary.BigEndian.Uint32(lb))))
}

// Validate checks the fields a recorder must fill.
func (e *Event) Validate() error {
	if e.ID == uuid.Nil {
		return errors.New("event has no id")
	}
	if e.Time.IsZero() {
		return errors.New("event has no time")
	}
	if !kinds[e.Kind] {
		return fmt.Errorf("event kind %q is unknown", e.Kind)
	}
	if len(e.Attributes) != 0 && !e.attrsCanonical() && !json.Valid(e.Attributes) {
		return errors.New("event attributes are not valid JSON")
	}
	return nil
}

// NewEvent returns an event of kind at t with a fresh UUIDv7 id and the
// time normalized the way the canonical encoding needs it.
func NewEvent(kind string, t time.Time) (Event, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return Event{}, fmt.Errorf("new event id: %w", err)
	}
	return Event{ID: id, Time: NormalizeTime(t), Kind: kind, Attributes: emptyObject, canon: emptyObject}, nil
}

// NormalizeTime returns t in UTC truncated to microseconds, the precision
// PostgreSQL stores, so that a hash recomputed from a row matches.
func NormalizeTime(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }

// CanonicalJSON re-encodes a JSON value the way attributes are hashed and
// stored: objects with keys sorted, no insignificant space, numbers as
// float64 in Go's shortest form, no HTML escaping, and NUL characters
// removed (PostgreSQL's jsonb refuses them). It is idempotent, and
// applying it to the text PostgreSQL returns for the stored jsonb gives
// back the same bytes, which is what lets verify recompute hashes from
// rows.
func CanonicalJSON(raw []byte) (json.RawMessage, error) {
	if len(bytes.TrimSpace(raw)) == 0 {
		return emptyObject, nil
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, fmt.Errorf("canonical json: %w", err)
	}
	return canonicalValue(v)
}

func canonicalValue(v any) (json.RawMessage, error) {
	v, ok := plain(v)
	if !ok {
		// Other Go types (structs, typed maps) encode differently from
		// their decoded form: take the round trip.
		b, err := json.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("canonical json: %w", err)
		}
		return CanonicalJSON(b)
	}
	v = stripNUL(v)
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("canonical json: %w", err)
	}
	return json.RawMessage(bytes.TrimSuffix(buf.Bytes(), []byte("\n"))), nil
}

// canonicalString drops NULs and spells invalid UTF-8 as U+FFFD, as a
// decode of the encoded text would (encoding/json would otherwise write
// an escaped U+FFFD that a re-encode spells out).
func canonicalString(s string) string {
	if strings.IndexByte(s, 0) >= 0 {
		s = strings.ReplaceAll(s, "\x00", "")
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}

func stripNUL(v any) any {
	switch t := v.(type) {
	case string:
		return canonicalString(t)
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, x := range t {
			out[canonicalString(k)] = stripNUL(x)
		}
		return out
	case []any:
		for i := range t {
			t[i] = stripNUL(t[i])
		}
		return t
	}
	return v
}

// plain converts v to what json.Unmarshal into any would produce (numbers
// as float64, map[string]any, []any), reporting false for anything else.
func plain(v any) (any, bool) {
	switch t := v.(type) {
	case nil, bool, string, float64:
		return t, true
	case int:
		return float64(t), true
	case int32:
		return float64(t), true
	case int64:
		return float64(t), true
	case uint32:
		return float64(t), true
	case uint64:
		return float64(t), true
	case float32:
		return float64(t), true
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, x := range t {
			p, ok := plain(x)
			if !ok {
				return nil, false
			}
			out[k] = p
		}
		return out, true
	case map[string]string:
		out := make(map[string]any, len(t))
		for k, x := range t {
			out[k] = x
		}
		return out, true
	case []any:
		out := make([]any, len(t))
		for i, x := range t {
			p, ok := plain(x)
			if !ok {
				return nil, false
			}
			out[i] = p
		}
		return out, true
	case []string:
		out := make([]any, len(t))
		for i, x := range t {
			out[i] = x
		}
		return out, true
	}
	return nil, false
}
