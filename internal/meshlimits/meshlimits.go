// Package meshlimits holds the numeric bounds that both the mesh config's
// validation (which refuses a value at apply time) and writ-proxy's route
// validation (which NACKs one it is sent) enforce, so the two cannot
// drift apart: a route writd accepts is one every sidecar accepts.
// Anyone may import it.
package meshlimits

const (
	// MaxRetries bounds a route's retries (attempts after the first);
	// zero means no retry.
	MaxRetries = 10

	// MinGRPCStatus and MaxGRPCStatus bound a fault's gRPC abort code:
	// the non-OK codes (OK, 0, is not a failure to inject).
	MinGRPCStatus = 1
	MaxGRPCStatus = 16

	// MaxRequestBodyBytes bounds the request body a sidecar buffers for
	// policy (ext_authz with_request_body max_request_bytes): each
	// request being checked may hold this much in memory.
	MaxRequestBodyBytes = 4 << 20
)
