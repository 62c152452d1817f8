package xds

import "github.com/writmesh/writ/config"

// The admin API's mesh messages, shared by writd and the writ CLI.

// SourceFile is one YAML file sent for apply or diff.
type SourceFile struct {
	Name    string `json:"name"`
	Content string `json:"content"`
}

// ApplyRequest asks writd to apply (or, with DryRun, diff) files.
type ApplyRequest struct {
	Files  []SourceFile `json:"files"`
	DryRun bool         `json:"dry_run,omitempty"`
}

// ApplyResponse says what changed (or would change).
type ApplyResponse struct {
	Generation int64    `json:"generation"`
	Changes    []Change `json:"changes"`
}

// ResourceList answers a get of a kind.
type ResourceList struct {
	Resources []*config.Resource `json:"resources"`
}

// HistoryResponse is a resource's revisions, oldest first.
type HistoryResponse struct {
	Revisions []Revision `json:"revisions"`
}

// RollbackRequest names the revision to bring back.
type RollbackRequest struct {
	Revision int64 `json:"revision"`
}

// NodeStatus is what writd knows of one connected xDS node.
type NodeStatus struct {
	NodeID    string `json:"node_id"`
	SPIFFEID  string `json:"spiffe_id"`
	Version   string `json:"version"`
	Acked     string `json:"acked_version,omitempty"`
	LastError string `json:"last_error,omitempty"`
}

// NodeList answers GET /v1/mesh/nodes.
type NodeList struct {
	Nodes []NodeStatus `json:"nodes"`
}
