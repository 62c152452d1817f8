package enforcer

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/genproto/googleapis/rpc/code"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// outcome is a policy result mapped onto the Envoy response.
type outcome struct {
	allowed bool
	status  int // HTTP status of a denial
	resp    *authv3.CheckResponse
}

// mapDecision turns a policy value into a CheckResponse the way
// opa-envoy-plugin documents it: a boolean allows or denies; an object
// must carry a boolean "allowed" and may carry "headers" (added to the
// upstream request when allowed, to the denial otherwise),
// "response_headers_to_add", "request_headers_to_remove", "http_status" and
// "body" (denials only) and "dynamic_metadata". Any malformed field is an
// error, which the caller turns into a deny.
func mapDecision(v any) (outcome, error) {
	switch d := v.(type) {
	case bool:
		if d {
			return plainAllow, nil
		}
		return plainDeny, nil
	case map[string]any:
		return mapObject(d)
	default:
		return outcome{}, fmt.Errorf("decision is %s, want boolean or object", jsonType(v))
	}
}

func mapObject(d map[string]any) (outcome, error) {
	av, ok := d["allowed"]
	if !ok {
		return outcome{}, errors.New(`decision object has no "allowed"`)
	}
	allowed, ok := av.(bool)
	if !ok {
		return outcome{}, fmt.Errorf(`decision "allowed" is %s, want boolean`, jsonType(av))
	}
	headers, err := headerOptions(d, "headers")
	if err != nil {
		return outcome{}, err
	}
	var meta *structpb.Struct
	if mv, ok := d["dynamic_metadata"]; ok {
		m, ok := mv.(map[string]any)
		if !ok {
			return outcome{}, fmt.Errorf(`decision "dynamic_metadata" is %s, want object`, jsonType(mv))
		}
		if meta, err = structpb.NewStruct(m); err != nil {
			return outcome{}, fmt.Errorf(`decision "dynamic_metadata": %w`, err)
		}
	}
	if allowed {
		toAdd, err := headerOptions(d, "response_headers_to_add")
		if err != nil {
			return outcome{}, err
		}
		toRemove, err := stringList(d, "request_headers_to_remove")
		if err != nil {
			return outcome{}, err
		}
		return allowOutcome(headers, toAdd, toRemove, meta), nil
	}
	status := http.StatusForbidden
	if sv, ok := d["http_status"]; ok {
		n, ok := sv.(json.Number)
		if !ok {
			return outcome{}, fmt.Errorf(`decision "http_status" is %s, want number`, jsonType(sv))
		}
		i, err := n.Int64()
		if err != nil || http.StatusText(int(i)) == "" {
			return outcome{}, fmt.Errorf(`decision "http_status" %s is not an HTTP status`, n)
		}
		if _, ok := typev3.StatusCode_name[int32(i)]; !ok {
			return outcome{}, fmt.Errorf(`decision "http_status" %s is not a status Envoy can send`, n)
		}
		status = int(i)
	}
	body := ""
	if bv, ok := d["body"]; ok {
		if body, ok = bv.(string); !ok {
			return outcome{}, fmt.Errorf(`decision "body" is %s, want string`, jsonType(bv))
		}
	}
	return denyOutcome(status, code.Code_PERMISSION_DENIED, headers, body, meta), nil
}

// plainAllow and plainDeny answer boolean decisions, the common case,
// without building a response each time: responses are read-only for
// every caller (gRPC marshals them, writ-proxy reads them).
var (
	plainAllow = allowOutcome(nil, nil, nil, nil)
	plainDeny  = denyOutcome(http.StatusForbidden, code.Code_PERMISSION_DENIED, nil, "", nil)
)

func allowOutcome(headers, toAdd []*corev3.HeaderValueOption, toRemove []string, meta *structpb.Struct) outcome {
	return outcome{allowed: true, status: http.StatusOK, resp: &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(code.Code_OK)},
		HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
			Headers:              headers,
			HeadersToRemove:      toRemove,
			ResponseHeadersToAdd: toAdd,
		}},
		DynamicMetadata: meta,
	}}
}

// mergeAllows is the allow of several decisions that all allowed: their
// upstream headers, headers to remove, response headers and dynamic
// metadata together (a later decision's metadata keys win). Outcomes
// without any of these merge into the shared plain allow.
func mergeAllows(outs []outcome) outcome {
	var headers, toAdd []*corev3.HeaderValueOption
	var toRemove []string
	var meta *structpb.Struct
	for _, o := range outs {
		ok := o.resp.GetOkResponse()
		headers = append(headers, ok.GetHeaders()...)
		toAdd = append(toAdd, ok.GetResponseHeadersToAdd()...)
		toRemove = append(toRemove, ok.GetHeadersToRemove()...)
		if m := o.resp.GetDynamicMetadata(); m != nil {
			if meta == nil {
				meta = &structpb.Struct{Fields: map[string]*structpb.Value{}}
			}
			for k, v := range m.GetFields() {
				meta.Fields[k] = v
			}
		}
	}
	if headers == nil && toAdd == nil && toRemove == nil && meta == nil {
		return plainAllow
	}
	return allowOutcome(headers, toAdd, toRemove, meta)
}

func denyOutcome(status int, c code.Code, headers []*corev3.HeaderValueOption, body string, meta *structpb.Struct) outcome {
	return outcome{status: status, resp: &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(c)},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(status)},
			Headers: headers,
			Body:    body,
		}},
		DynamicMetadata: meta,
	}}
}

// headerOptions reads a header field: an object of name to string or list
// of strings, or a list of such objects. Names are sorted so that the
// response does not depend on map order.
func headerOptions(d map[string]any, field string) ([]*corev3.HeaderValueOption, error) {
	v, ok := d[field]
	if !ok {
		return nil, nil
	}
	var objs []map[string]any
	switch v := v.(type) {
	case map[string]any:
		objs = []map[string]any{v}
	case []any:
		for _, e := range v {
			m, ok := e.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("decision %q holds %s, want object", field, jsonType(e))
			}
			objs = append(objs, m)
		}
	default:
		return nil, fmt.Errorf("decision %q is %s, want object or array", field, jsonType(v))
	}
	var out []*corev3.HeaderValueOption
	add := func(k, v string) {
		out = append(out, &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, Value: v}})
	}
	for _, m := range objs {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			switch hv := m[k].(type) {
			case string:
				add(k, hv)
			case []any:
				for _, e := range hv {
					s, ok := e.(string)
					if !ok {
						return nil, fmt.Errorf("decision %q header %q holds %s, want string", field, k, jsonType(e))
					}
					add(k, s)
				}
			default:
				return nil, fmt.Errorf("decision %q header %q is %s, want string or array", field, k, jsonType(hv))
			}
		}
	}
	return out, nil
}

func stringList(d map[string]any, field string) ([]string, error) {
	v, ok := d[field]
	if !ok {
		return nil, nil
	}
	l, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("decision %q is %s, want array", field, jsonType(v))
	}
	out := make([]string, 0, len(l))
	for _, e := range l {
		s, ok := e.(string)
		if !ok {
			return nil, fmt.Errorf("decision %q holds %s, want string", field, jsonType(e))
		}
		out = append(out, s)
	}
	return out, nil
}

func jsonType(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case json.Number, float64, int:
		return "number"
	case string:
		return "string"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}
