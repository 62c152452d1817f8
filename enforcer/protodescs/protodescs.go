// Package protodescs loads the FileDescriptorSet files (protoc
// --descriptor_set_out --include_imports, buf build -o x.pb) whose
// services' request messages the enforcer decodes into input.parsed_body
// (enforcer.Options.ProtoDescriptors), as opa-envoy-plugin's
// proto_descriptor does.
//
// It is apart from package enforcer so that the binaries that never load
// such a file (writ-proxy) do not link protodesc, whose package init
// decodes protobuf's edition defaults and so keeps the full reflection
// of descriptor.proto (~135 KiB of heap) for the life of every process.
// Only writ-enforcer imports it.
package protodescs

import (
	"fmt"
	"os"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// Load reads a FileDescriptorSet file into a registry of its files.
func Load(file string) (*protoregistry.Files, error) {
	bs, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("proto descriptors: %w", err)
	}
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(bs, &set); err != nil {
		return nil, fmt.Errorf("proto descriptors %s: %w", file, err)
	}
	files, err := protodesc.NewFiles(&set)
	if err != nil {
		return nil, fmt.Errorf("proto descriptors %s: %w", file, err)
	}
	return files, nil
}
