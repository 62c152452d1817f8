package enforcer

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"

	"github.com/writmesh/writ/policy"
)

// Binder gives the enforcer of a writ.authz_decision value (the queries
// of the AuthorizationPolicies enforced on a service, joined by ","): one
// Enforcer deciding by all of them, where every one must allow (see
// Options.Also), and beside it the dry-run ones (writ.authz_dry_run),
// evaluated and recorded but never enforced (Options.CandidateAlso).
// writ-proxy binds it per inbound listener, writ-enforcer per request.
// Engines and enforcers are made once per query and per value and then
// cached, within bounds: the values come from the network (an Envoy's
// context extensions), so a peer naming ever new queries must not grow
// the caches or keep the policies compiling. It is safe for concurrent
// use.
type Binder struct {
	base      Options
	newEngine func(ctx context.Context, decision string) (*policy.Engine, error)

	mu      sync.Mutex
	engines map[string]*policy.Engine // made by newEngine, by query
	made    []*policy.Engine
	byValue map[binding]*Enforcer
	// failed remembers values that could not be bound until the next
	// Reload, so that requests naming a missing rule do not each
	// compile the policies again.
	failed map[binding]error
}

// Bounds on what the network can make a Binder hold: a mesh binds a
// handful of policy queries, nowhere near these.
const (
	maxBindings        = 256 // bound and failed values together
	maxEngines         = 256 // queries with an engine of their own
	maxQueriesPerValue = 16
)

// binding is a service's enforced and dry-run decision lists.
type binding struct{ decision, dryRun string }

// NewBinder returns a Binder whose enforcers take everything but their
// engines from base; base.Engine serves the query it decides by, and
// newEngine makes the engine of any other query, over the same policies.
func NewBinder(base Options, newEngine func(ctx context.Context, decision string) (*policy.Engine, error)) *Binder {
	return &Binder{base: base, newEngine: newEngine, engines: map[string]*policy.Engine{}, byValue: map[binding]*Enforcer{}, failed: map[binding]error{}}
}

// SplitDecisions splits a writ.authz_decision value into its queries,
// refusing empty ones and more than maxQueriesPerValue.
func SplitDecisions(value string) ([]string, error) {
	if n := strings.Count(value, ",") + 1; n > maxQueriesPerValue {
		return nil, fmt.Errorf("decision list names %d queries, over %d", n, maxQueriesPerValue)
	}
	ds := strings.Split(value, ",")
	for i, d := range ds {
		ds[i] = strings.TrimSpace(d)
		if ds[i] == "" {
			return nil, fmt.Errorf("decision list %q has an empty query", value)
		}
	}
	return ds, nil
}

// For returns the enforcer deciding by every query of value and, when
// dryRun is not empty, evaluating every query of dryRun as its dry-run
// candidate in place of base's. Dry-run queries that cannot be bound do
// not fail the binding: its decisions record why as the dry-run deny.
func (b *Binder) For(ctx context.Context, value, dryRun string) (*Enforcer, error) {
	key := binding{value, dryRun}
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.byValue[key]; e != nil {
		return e, nil
	}
	if err := b.failed[key]; err != nil {
		return nil, err
	}
	if len(b.byValue)+len(b.failed) >= maxBindings {
		// Refused, not remembered: the bound is what keeps failed small.
		return nil, fmt.Errorf("%d policy bindings already held: refusing another", maxBindings)
	}
	e, err := b.bindLocked(ctx, key)
	if err != nil {
		b.failed[key] = err
		return nil, err
	}
	b.byValue[key] = e
	return e, nil
}

func (b *Binder) bindLocked(ctx context.Context, key binding) (*Enforcer, error) {
	engs, err := b.enginesLocked(ctx, key.decision)
	if err != nil {
		return nil, err
	}
	opts := b.base
	opts.Engine, opts.Also = engs[0], engs[1:]
	if key.dryRun != "" {
		opts.Candidate, opts.CandidateAlso, opts.CandidateErr = nil, nil, nil
		if dry, err := b.enginesLocked(ctx, key.dryRun); err != nil {
			opts.CandidateErr = err
		} else {
			opts.Candidate, opts.CandidateAlso = dry[0], dry[1:]
		}
	}
	return New(opts)
}

func (b *Binder) enginesLocked(ctx context.Context, value string) ([]*policy.Engine, error) {
	ds, err := SplitDecisions(value)
	if err != nil {
		return nil, err
	}
	var engs []*policy.Engine
	for _, d := range ds {
		eng, err := b.engineLocked(ctx, d)
		if err != nil {
			return nil, fmt.Errorf("policy decision %s: %w", d, err)
		}
		engs = append(engs, eng)
	}
	return engs, nil
}

func (b *Binder) engineLocked(ctx context.Context, d string) (*policy.Engine, error) {
	if b.base.Engine != nil && d == b.base.Engine.DecisionPath().String() {
		return b.base.Engine, nil
	}
	if eng := b.engines[d]; eng != nil {
		return eng, nil
	}
	if b.newEngine == nil {
		return nil, errors.New("no engine for other decisions than " + b.base.Engine.DecisionPath().String())
	}
	if len(b.engines) >= maxEngines {
		return nil, fmt.Errorf("%d policy queries already loaded: refusing another", maxEngines)
	}
	eng, err := b.newEngine(ctx, d)
	if err != nil {
		return nil, err
	}
	b.engines[d] = eng
	b.made = append(b.made, eng)
	return eng, nil
}

// Reload reloads the engines the Binder made (not base.Engine, whose
// owner reloads it), after the policies changed; each keeps its last good
// set on error, and the errors are joined.
func (b *Binder) Reload(ctx context.Context) error {
	b.mu.Lock()
	engs := append([]*policy.Engine(nil), b.made...)
	clear(b.failed)
	// Bound without their dry-run policies: bind again, they may compile
	// now.
	maps.DeleteFunc(b.byValue, func(_ binding, e *Enforcer) bool { return e.candErr != nil })
	b.mu.Unlock()
	var errs []error
	for _, e := range engs {
		if err := e.Reload(ctx); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", e.DecisionPath(), err))
		}
	}
	return errors.Join(errs...)
}
