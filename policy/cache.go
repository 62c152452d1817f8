package policy

import (
	"hash/maphash"
	"sync"
	"sync/atomic"

	"github.com/open-policy-agent/opa/v1/ast"
)

// decisionCache memoizes decisions of one compiled policy set. It keys on
// the values of exactly the input paths the set reads, so two inputs that
// agree on those values share an entry. It belongs to one revision and is
// dropped with it. It is safe for concurrent use.
//
// The cache is a set of shards, each a bounded map with random eviction:
// cheaper under contention than one LRU list, and as good for a workload
// whose hot set fits.
type decisionCache struct {
	paths    [][]string    // nil means the whole input
	terms    [][]*ast.Term // paths as key terms, made once: InternedTerm allocates for most names
	shards   [cacheShards]cacheShard
	perShard int
	seed     maphash.Seed

	lookups   atomic.Uint64
	hits      atomic.Uint64
	skipUntil atomic.Uint64 // lookup count until which the cache is bypassed
}

// use reports whether this lookup should go through the cache, and keeps
// the hit-rate window.
func (c *decisionCache) use() bool {
	n := c.lookups.Add(1)
	if n < c.skipUntil.Load() {
		return false
	}
	if n%cacheWindow == 0 {
		h := c.hits.Swap(0)
		if h*cacheMinHitRatio < cacheWindow {
			c.skipUntil.Store(n + cacheSkipWindows*cacheWindow)
		}
	}
	return true
}

const cacheShards = 16

// maxKeyBytes bounds the input a cache entry may hold, so that the cache's
// memory is bounded by entries times this, whatever clients send.
const maxKeyBytes = 2048

// The cache watches its hit rate over windows of cacheWindow lookups. When
// fewer than one in cacheMinHitRatio hit (every request distinct, as with
// ids in paths), it steps aside for cacheSkipWindows windows and then
// probes again, so that a cache that cannot help costs almost nothing.
const (
	cacheWindow      = 4096
	cacheMinHitRatio = 32
	cacheSkipWindows = 16
)

type cacheShard struct {
	mu sync.RWMutex
	m  map[uint64][]cacheEntry
	n  int
}

type cacheEntry struct {
	key   []ast.Value
	value Result
}

// keyMissing stands for an input path that is not present, so that "absent"
// and "present with some value" never share a key.
var keyMissing ast.Value = ast.Var("$missing")

func newDecisionCache(paths [][]string, size int) *decisionCache {
	per := size / cacheShards
	if per < 1 {
		per = 1
	}
	c := &decisionCache{paths: paths, terms: pathTerms(paths), perShard: per, seed: maphash.MakeSeed()}
	for i := range c.shards {
		c.shards[i].m = make(map[uint64][]cacheEntry)
	}
	return c
}

// key extracts the values the policy can observe. For a path that runs into
// a non-object before its end, the key holds the value where it stopped and
// how deep it got: any read below that point sees the same thing. size is
// about how many bytes the key holds; put refuses keys over maxKeyBytes.
func (c *decisionCache) key(input ast.Value) (key []ast.Value, sum uint64, size int) {
	var h maphash.Hash
	h.SetSeed(c.seed)
	if c.paths == nil {
		size = writeHash(&h, input)
		return []ast.Value{input}, h.Sum64(), size
	}
	key = make([]ast.Value, 0, len(c.paths)*2)
	for _, p := range c.terms {
		v := input
		depth := 0
		for _, k := range p {
			obj, ok := v.(ast.Object)
			if !ok {
				break
			}
			t := obj.Get(k)
			if t == nil {
				v = keyMissing
				break
			}
			v = t.Value
			depth++
		}
		key = append(key, ast.InternedTerm(depth).Value, v)
		h.WriteByte(byte(depth))
		size += writeHash(&h, v) + 1
	}
	return key, h.Sum64(), size
}

func (c *decisionCache) get(key []ast.Value, sum uint64) (Result, bool) {
	s := &c.shards[sum%cacheShards]
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, e := range s.m[sum] {
		if keysEqual(e.key, key) {
			c.hits.Add(1)
			return e.value, true
		}
	}
	return Result{}, false
}

func (c *decisionCache) put(key []ast.Value, sum uint64, d Result) {
	s := &c.shards[sum%cacheShards]
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.m[sum] {
		if keysEqual(e.key, key) {
			return
		}
	}
	if s.n >= c.perShard {
		// Random eviction: Go's map iteration order is randomized.
		for k, es := range s.m {
			s.n -= len(es)
			delete(s.m, k)
			if s.n < c.perShard {
				break
			}
		}
	}
	s.m[sum] = append(s.m[sum], cacheEntry{key: key, value: d})
	s.n++
}

func (c *decisionCache) len() int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.RLock()
		n += s.n
		s.mu.RUnlock()
	}
	return n
}

func keysEqual(a, b []ast.Value) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !strictEqual(a[i], b[i]) {
			return false
		}
	}
	return true
}

// strictEqual is value equality that also tells apart numbers Rego calls
// equal but prints differently (1 and 1.0), so that a cached answer is the
// very answer evaluation would give, down to formatted strings.
func strictEqual(a, b ast.Value) bool {
	switch a := a.(type) {
	case ast.Null:
		_, ok := b.(ast.Null)
		return ok
	case ast.Boolean:
		bb, ok := b.(ast.Boolean)
		return ok && a == bb
	case ast.String:
		bs, ok := b.(ast.String)
		return ok && a == bs
	case ast.Number:
		bn, ok := b.(ast.Number)
		return ok && a == bn
	case ast.Var:
		bv, ok := b.(ast.Var)
		return ok && a == bv
	case *ast.Array:
		ba, ok := b.(*ast.Array)
		if !ok || a.Len() != ba.Len() {
			return false
		}
		for i := 0; i < a.Len(); i++ {
			if !strictEqual(a.Elem(i).Value, ba.Elem(i).Value) {
				return false
			}
		}
		return true
	case ast.Object:
		bo, ok := b.(ast.Object)
		if !ok || a.Len() != bo.Len() {
			return false
		}
		eq := true
		a.Foreach(func(k, v *ast.Term) {
			if !eq {
				return
			}
			if _, isStr := k.Value.(ast.String); !isStr {
				// Non-string keys: fall back to printed form below.
				eq = false
				return
			}
			w := bo.Get(k)
			eq = w != nil && strictEqual(v.Value, w.Value)
		})
		if eq {
			return true
		}
		return a.Compare(bo) == 0 && a.String() == bo.String()
	default:
		return a.Compare(b) == 0 && a.String() == b.String()
	}
}

// writeHash feeds v into h and returns about how many bytes v holds.
// Objects are hashed independent of key order, like their equality.
func writeHash(h *maphash.Hash, v ast.Value) int {
	switch v := v.(type) {
	case ast.String:
		h.WriteByte('s')
		h.WriteString(string(v))
		return len(v) + 1
	case ast.Number:
		h.WriteByte('n')
		h.WriteString(string(v))
		return len(v) + 1
	case ast.Boolean:
		if v {
			h.WriteByte('t')
		} else {
			h.WriteByte('f')
		}
		return 1
	case ast.Null:
		h.WriteByte('0')
		return 1
	case *ast.Array:
		h.WriteByte('[')
		n := 2
		for i := 0; i < v.Len(); i++ {
			n += writeHash(h, v.Elem(i).Value)
		}
		h.WriteByte(']')
		return n
	case ast.Object:
		var sum uint64
		n := 9
		seed := h.Seed()
		v.Foreach(func(k, val *ast.Term) {
			var eh maphash.Hash
			eh.SetSeed(seed)
			n += writeHash(&eh, k.Value)
			n += writeHash(&eh, val.Value)
			sum += eh.Sum64()
		})
		h.WriteByte('{')
		var b [8]byte
		for i := range b {
			b[i] = byte(sum >> (8 * i))
		}
		h.Write(b[:])
		return n
	default:
		s := v.String()
		h.WriteByte('?')
		h.WriteString(s)
		return len(s) + 1
	}
}

// pathTerms turns paths into string terms once.
func pathTerms(paths [][]string) [][]*ast.Term {
	if paths == nil {
		return nil
	}
	out := make([][]*ast.Term, len(paths))
	for i, p := range paths {
		out[i] = make([]*ast.Term, len(p))
		for j, k := range p {
			out[i][j] = ast.StringTerm(k)
		}
	}
	return out
}
