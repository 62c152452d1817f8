package protodescs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// TestLoad: a set with its imports loads and names its messages; a
// missing file, bytes that are not a set, and a set missing an import
// are errors naming the file.
func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}
	dur := protodesc.ToFileDescriptorProto(durationpb.File_google_protobuf_duration_proto)
	user := &descriptorpb.FileDescriptorProto{
		Name: proto.String("orders.proto"), Package: proto.String("orders"), Syntax: proto.String("proto3"),
		Dependency: []string{dur.GetName()},
		MessageType: []*descriptorpb.DescriptorProto{{
			Name: proto.String("Order"),
			Field: []*descriptorpb.FieldDescriptorProto{{
				Name: proto.String("ttl"), Number: proto.Int32(1), JsonName: proto.String("ttl"),
				Label:    descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
				Type:     descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum(),
				TypeName: proto.String(".google.protobuf.Duration"),
			}},
		}},
	}
	marshal := func(files ...*descriptorpb.FileDescriptorProto) []byte {
		b, err := proto.Marshal(&descriptorpb.FileDescriptorSet{File: files})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	files, err := Load(write("good.pb", marshal(dur, user)))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if _, err := files.FindDescriptorByName("orders.Order"); err != nil {
		t.Errorf("orders.Order: %v", err)
	}

	for name, file := range map[string]string{
		"missing":        filepath.Join(dir, "none.pb"),
		"not a set":      write("junk.pb", []byte{0xff, 0xff, 0xff}),
		"missing import": write("partial.pb", marshal(user)),
	} {
		if _, err := Load(file); err == nil || !strings.Contains(err.Error(), filepath.Base(file)) {
			t.Errorf("%s: got %v, want an error naming %s", name, err, filepath.Base(file))
		}
	}
}
