package policy

import (
	"context"
	"hash/maphash"
	"slices"

	"github.com/open-policy-agent/opa/v1/ast"
)

// Facts answers the input paths of a policy set straight from the
// caller's request, so that a decision the cache or the residual fast path
// can give needs no input document at all: building it was half the cost
// of such a decision. Lookup returns the value at path, or ok false when
// the value is absent or the caller cannot tell without building the
// input; either way the caller then builds the input and calls Eval.
type Facts interface {
	Lookup(path []string) (v *ast.Term, ok bool)
}

// EvalFacts answers from the decision cache or the residual fast path
// when every input path the set reads is in f; ok false means the caller
// must build the input and call Eval, which gives the same answer. It
// never evaluates the policy in full. Safe for concurrent use.
func (s Snapshot) EvalFacts(ctx context.Context, f Facts) (Result, bool) {
	set := s.set
	if set.cache == nil || ctx.Err() != nil {
		return Result{}, false
	}
	useCache := set.cache.use()
	var kb [keyOnStack]ast.Value
	key, sum, size, ok := set.cache.keyFacts(f, kb[:0])
	if !ok || size > maxKeyBytes {
		return Result{}, false
	}
	if useCache {
		if r, ok := set.cache.get(key, sum); ok {
			r.Cached = true
			return r, true
		}
	}
	if set.fast == nil {
		return Result{}, false
	}
	r, ok := set.fast.evalFacts(ctx, f, set.revision)
	if !ok {
		return Result{}, false
	}
	if useCache {
		set.cache.put(slices.Clone(key), sum, r)
	}
	return r, true
}

// keyOnStack covers the cache keys of policies reading up to four input
// paths (two values each): building one then allocates nothing unless it
// is stored.
const keyOnStack = 8

// keyFacts is key for an input made of f's values, appended to buf
// (whose array the caller owns: a key to keep is cloned); ok is false
// unless every path is present in f (the key of a path that stops early
// records how far it got, which only the input can say).
func (c *decisionCache) keyFacts(f Facts, buf []ast.Value) (key []ast.Value, sum uint64, size int, ok bool) {
	if c.paths == nil {
		return nil, 0, 0, false
	}
	var h maphash.Hash
	h.SetSeed(c.seed)
	key = slices.Grow(buf[:0], len(c.paths)*2)
	for _, p := range c.paths {
		t, ok := f.Lookup(p)
		if !ok || t == nil {
			return nil, 0, 0, false
		}
		key = append(key, ast.InternedTerm(len(p)).Value, t.Value)
		h.WriteByte(byte(len(p)))
		size += writeHash(&h, t.Value) + 1
	}
	return key, h.Sum64(), size, true
}

// evalFacts is eval for a residual already computed for f's known values.
func (r *residuals) evalFacts(ctx context.Context, f Facts, revision string) (Result, bool) {
	if !r.cache.use() {
		return Result{}, false
	}
	var vals [4]*ast.Term
	if len(r.unknown) > len(vals) {
		return Result{}, false
	}
	for i, p := range r.unknown {
		t, ok := f.Lookup(p)
		if !ok || t == nil {
			return Result{}, false
		}
		if _, ok := t.Value.(ast.String); !ok {
			return Result{}, false
		}
		vals[i] = t
	}
	var kb [keyOnStack]ast.Value
	key, sum, size, ok := r.cache.keyFacts(f, kb[:0])
	if !ok || size > maxKeyBytes {
		return Result{}, false
	}
	cached, ok := r.cache.get(key, sum)
	if !ok {
		return Result{}, false // computing it needs the input
	}
	res, _ := cached.Value.(*residual)
	if res == nil {
		return Result{}, false
	}
	return r.answer(ctx, res, vals[:len(r.unknown)], revision)
}
