package main

import (
	"slices"
	"testing"
)

func TestOutcomes(t *testing.T) {
	a := &Answer{Service: "frontend", Version: "v1", Calls: map[string]*Answer{
		"orders": {Service: "orders", Version: "v2", Calls: map[string]*Answer{
			"payments": {Service: "payments", Version: "v1"},
		}},
		"payments": {Status: 403, Error: "denied"},
	}}
	got := outcomes(a)
	slices.Sort(got)
	want := []string{"frontend -> payments: denied by policy (403)", "frontend v1: ok", "orders v2: ok", "payments v1: ok"}
	if !slices.Equal(got, want) {
		t.Fatalf("outcomes = %q, want %q", got, want)
	}
	if got := outcomes(&Answer{Error: "connection refused"}); !slices.Equal(got, []string{"frontend: error: connection refused"}) {
		t.Fatalf("outcomes of a failed call = %q", got)
	}
}
