package enforcer

import (
	"encoding/json"
	"errors"
	"fmt"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/writmesh/writ/audit"
)

// Replayable causes: the recorded result is the policy's answer, so a
// candidate policy's answer to the same input can be compared with it.
// Other causes (a bad path, an input error, a refused audit append) were
// decided before or after policy.
var replayable = map[string]bool{CausePolicy: true, CauseUndefined: true, CausePolicyError: true, CauseInvalidDecision: true}

// Replayable says whether ev is a request decision whose recorded result
// came from policy.
func Replayable(ev audit.Event) bool {
	return ev.Kind == audit.KindRequest && replayable[ev.Cause]
}

// ReplayRequest rebuilds the CheckRequest a request event recorded, as far
// as the event holds it: the peers' principals, the method, the path as
// sent (with its query), host, protocol and the headers the redaction
// allowlist kept. What was not recorded — other headers, the body, peer
// addresses — is absent, so a policy reading them sees them missing.
func ReplayRequest(ev audit.Event) (*authv3.CheckRequest, error) {
	if ev.Kind != audit.KindRequest {
		return nil, fmt.Errorf("replay: event %s is a %s, not a request", ev.ID, ev.Kind)
	}
	var a struct {
		RawPath  string            `json:"raw_path"`
		Protocol string            `json:"protocol"`
		Host     string            `json:"host"`
		GRPC     bool              `json:"grpc"`
		Headers  map[string]string `json:"headers"`
	}
	if len(ev.Attributes) > 0 {
		if err := json.Unmarshal(ev.Attributes, &a); err != nil {
			return nil, fmt.Errorf("replay: event %s attributes: %w", ev.ID, err)
		}
	}
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: ev.Principal},
		Destination: &authv3.AttributeContext_Peer{Principal: ev.Destination},
	}}
	if ev.Action == "" && a.RawPath == "" && a.Protocol == "" {
		return req, nil // a connection-level (L4) check
	}
	if a.RawPath == "" {
		if ev.Resource == "" {
			return nil, errors.New("replay: event " + ev.ID.String() + " has no path")
		}
		a.RawPath = ev.Resource
	}
	h := map[string]string{}
	for k, v := range a.Headers {
		h[k] = v
	}
	h[":method"], h[":path"] = ev.Action, a.RawPath
	if a.Host != "" {
		h[":authority"] = a.Host
	}
	if a.GRPC && h["content-type"] == "" {
		h["content-type"] = "application/grpc"
	}
	req.Attributes.Request = &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
		Method: ev.Action, Path: a.RawPath, Host: a.Host, Protocol: a.Protocol, Headers: h,
	}}
	return req, nil
}
