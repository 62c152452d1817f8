// Package nodeapi is the generated gRPC API between writd and its node
// agents. Regenerate with `go generate ./authority/nodeapi` (protoc,
// protoc-gen-go and protoc-gen-go-grpc on PATH; see the Makefile's proto
// target).
package nodeapi

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative nodeapi.proto
