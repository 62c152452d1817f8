package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/writmesh/writ/audit"
	"github.com/writmesh/writ/audit/collector"
	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/enforcer"
	"github.com/writmesh/writ/policy"
	"github.com/writmesh/writ/xds"
)

// The events writd records itself go straight into PostgreSQL with
// collector.RecordTx, inside the transaction of the change they record:
// both commit or neither, so each is there exactly once.

// issuanceEvents records issuance log rows (SVIDs, node SVIDs,
// intermediates, join-token uses, refusals) as audit events. The
// issuance_log table stays: the CA reads it (the longest lifetime still
// valid, for root retirement) and `writ cert list` shows it.
func issuanceEvents(col *collector.Collector, source string) authority.IssuanceHook {
	return func(ctx context.Context, tx pgx.Tx, rows []authority.Issuance) error {
		evs := make([]*audit.Event, len(rows))
		for i, is := range rows {
			ev, err := issuanceEvent(is)
			if err != nil {
				return err
			}
			evs[i] = &ev
		}
		return col.RecordManyTx(ctx, tx, source, evs)
	}
}

func issuanceEvent(is authority.Issuance) (audit.Event, error) {
	kind := audit.KindCertIssued
	switch is.Outcome {
	case authority.OutcomeRenewed:
		kind = audit.KindCertRenewed
	case authority.OutcomeRefused:
		kind = audit.KindCertRefused
	case authority.OutcomeUsed:
		// A join token presented at attestation: the node logging in.
		kind = audit.KindLogin
	}
	ev, err := audit.NewEvent(kind, is.At)
	if err != nil {
		return ev, err
	}
	ev.Principal, ev.Destination, ev.Action, ev.Resource = is.Caller, is.SPIFFEID, is.Kind, is.Serial
	ev.Result, ev.Reason = is.Outcome, is.Reason
	attrs := map[string]any{}
	if !is.NotAfter.IsZero() {
		attrs["not_after"] = is.NotAfter.UTC().Format(time.RFC3339)
		if !is.At.IsZero() {
			attrs["lifetime_s"] = int64(is.NotAfter.Sub(is.At).Seconds())
		}
	}
	for k, v := range map[string]string{"node_id": is.NodeID, "entry_id": is.EntryID, "signer": is.Signer} {
		if v != "" {
			attrs[k] = v
		}
	}
	return ev, ev.SetAttributes(attrs)
}

// meshChangeEvents records mesh configuration changes: AuthorizationPolicy
// resources as policy changes, the rest as configuration changes, with
// the author and the diff.
func meshChangeEvents(col *collector.Collector, source string) xds.ChangeHook {
	return func(ctx context.Context, tx pgx.Tx, author, action string, ch xds.Change) error {
		kind := audit.KindConfigChange
		if ch.Kind == config.KindAuthorizationPolicy {
			kind = audit.KindPolicyChange
		}
		ev, err := audit.NewEvent(kind, time.Now())
		if err != nil {
			return err
		}
		ev.Principal, ev.Action, ev.Result = author, action, ch.Op
		ev.Resource = ch.Kind + "/" + ch.Namespace + "/" + ch.Name
		// kind, namespace, name and revision name the mesh_revisions row
		// the event records (compliance reports count the two as one).
		if err := ev.SetAttributes(map[string]any{"kind": ch.Kind, "namespace": ch.Namespace, "name": ch.Name,
			"revision": ch.Revision, "diff": ch.Diff}); err != nil {
			return err
		}
		return col.RecordTx(ctx, tx, source, &ev)
	}
}

// adminCallEvents records admin API calls.
func adminCallEvents(col *collector.Collector, source string) func(ctx context.Context, tx pgx.Tx, ev *audit.Event) error {
	return func(ctx context.Context, tx pgx.Tx, ev *audit.Event) error { return col.RecordTx(ctx, tx, source, ev) }
}

// policyReloadEvents records each reload attempt of one of writd's
// policy engines. Nothing in the database changes with a reload, so the
// event is written on its own; a failure to write it is logged (the
// reload already happened) and counted by the collector.
func policyReloadEvents(col *collector.Collector, source, name string, log *slog.Logger) func(policy.ReloadEvent) {
	return func(r policy.ReloadEvent) {
		ev, err := enforcer.PolicyReloadEvent(name, r)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err = col.Record(ctx, source, &ev)
		}
		if err != nil {
			log.Error("audit: policy reload not recorded", "policy", name, "revision", r.Revision, "err", err)
		}
	}
}
