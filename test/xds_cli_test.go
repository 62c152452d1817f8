package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const meshService = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: greeter, namespace: demo}
spec:
  ports: [{port: 50051, protocol: grpc}]
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
`

const meshRoute = `apiVersion: writ.dev/v1alpha1
kind: Route
metadata: {name: greeter, namespace: demo}
spec:
  service: greeter
  rules:
    - match: {pathPrefix: /grpc.testing.TestService/}
      destinations:
        - {subset: v1, weight: 80}
        - {subset: v2, weight: 20}
`

// TestMeshCLI drives writ apply/get/diff/history/rollback/delete against
// a real writd, and checks that bad YAML is refused with file, line and
// field and changes nothing.
func TestMeshCLI(t *testing.T) {
	w := startWritd(t)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	must := func(want string, args ...string) string {
		t.Helper()
		out, code := w.writ(t, args...)
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("writ %s: exit %d, output lacks %q:\n%s", strings.Join(args, " "), code, want, out)
		}
		return out
	}
	mdir := filepath.Join(dir, "mesh")
	os.Mkdir(mdir, 0o700)
	os.WriteFile(filepath.Join(mdir, "1-service.yaml"), []byte(meshService), 0o600)
	os.WriteFile(filepath.Join(mdir, "2-route.yaml"), []byte(meshRoute), 0o600)
	must("route/demo/greeter created (revision 1)", "apply", "-f", mdir)
	must("service/demo/greeter unchanged", "apply", "-f", mdir)

	out := must("kind: Route", "get", "route", "greeter", "-n", "demo", "-o", "yaml")
	if !strings.Contains(out, "weight: 80") || !strings.Contains(out, "apiVersion: writ.dev/v1alpha1") {
		t.Fatalf("get -o yaml:\n%s", out)
	}
	must(`"kind": "Service"`, "get", "service", "-o", "json")
	must("service greeter, 1 rules", "get", "routes")

	// Bad YAML: a typo in the second document of a file that also changes
	// the first. Nothing is stored.
	bad := write("bad.yaml", strings.Replace(meshService, "ports:", "ports: [{port: 50052, protocol: grpc}]\n  extra: 1\n  old_ports:", 1)+"---\n"+strings.Replace(meshRoute, "weight: 20", "wieght: 20", 1))
	out, code := w.writ(t, "apply", "-f", bad)
	if code != 1 || !strings.Contains(out, bad+":6: spec.extra: field extra not found") || !strings.Contains(out, bad+":21: spec.rules[0].destinations[1].wieght: field wieght not found") {
		t.Fatalf("bad apply: exit %d:\n%s", code, out)
	}
	// A split that does not sum to 100, and a subset nobody has.
	bad2 := write("bad2.yaml", strings.Replace(strings.Replace(meshRoute, "weight: 20", "weight: 30", 1), "subset: v1", "subset: v9", 1))
	out, code = w.writ(t, "apply", "-f", bad2)
	if code != 1 || !strings.Contains(out, "weights sum to 110, want 100") {
		t.Fatalf("bad split: exit %d:\n%s", code, out)
	}
	bad3 := write("bad3.yaml", strings.Replace(meshRoute, "subset: v1", "subset: v9", 1))
	out, code = w.writ(t, "apply", "-f", bad3)
	if code != 1 || !strings.Contains(out, bad3+`:9: spec.rules[0].destinations[0].subset: service greeter.demo has no subset "v9"`) {
		t.Fatalf("unknown subset: exit %d:\n%s", code, out)
	}
	// A path regex writ-proxy would NACK (its program is over the
	// sidecar's bound) is refused at apply time instead, with the weights
	// changed beside it to show that nothing of the file is stored.
	const bigRegex = `/grpc.testing.TestService/[a-z]{1000}[0-9]{1000}x{1000}y{1000}z{1000}`
	bad4 := write("bad4.yaml", strings.Replace(strings.Replace(strings.Replace(meshRoute, "{pathPrefix: /grpc.testing.TestService/}", "{pathRegex: \""+bigRegex+"\"}", 1), "weight: 80", "weight: 50", 1), "weight: 20", "weight: 50", 1))
	out, code = w.writ(t, "apply", "-f", bad4)
	if code != 1 || !strings.Contains(out, bad4+`:7: spec.rules[0].match.pathRegex: regex "`+bigRegex+`" compiles to 5030 instructions, more than 4096`) {
		t.Fatalf("oversized regex: exit %d:\n%s", code, out)
	}
	out = must("weight: 80", "get", "route", "greeter", "-n", "demo", "-o", "yaml")
	if strings.Contains(out, "v9") || strings.Contains(out, "pathRegex") {
		t.Fatalf("a refused apply changed the route:\n%s", out)
	}
	if out := must("REVISION", "history", "route", "greeter", "-n", "demo"); strings.Count(out, "apply") != 1 {
		t.Fatalf("history after refused applies:\n%s", out)
	}
	if out, code := w.writ(t, "get", "service", "missing"); code != 1 || !strings.Contains(out, "not found") {
		t.Fatalf("get missing: exit %d: %s", code, out)
	}

	// diff shows the change without making it; apply makes it.
	fifty := write("fifty.yaml", strings.Replace(strings.Replace(meshRoute, "weight: 80", "weight: 50", 1), "weight: 20", "weight: 50", 1))
	out = must("route/demo/greeter: would be updated", "diff", "-f", fifty)
	if !strings.Contains(out, "-               weight: 80") && !strings.Contains(out, "- ") {
		t.Fatalf("diff:\n%s", out)
	}
	must("weight: 80", "get", "route", "greeter", "-n", "demo", "-o", "yaml")
	must("route/demo/greeter updated (revision 2)", "apply", "-f", fifty)
	must("weight: 50", "get", "route", "greeter", "-n", "demo", "-o", "yaml")
	out = must("uid:", "history", "route", "greeter", "-n", "demo")
	if strings.Count(out, "apply") != 2 {
		t.Fatalf("history:\n%s", out)
	}
	must("rolled back to revision 1 as revision 3", "rollback", "route", "greeter", "-n", "demo", "--to", "1")
	must("weight: 80", "get", "route", "greeter", "-n", "demo", "-o", "yaml")

	// Deleting a service a route still uses is refused; the route first.
	if out, code := w.writ(t, "delete", "service", "greeter", "-n", "demo"); code != 1 || !strings.Contains(out, "not declared") {
		t.Fatalf("delete routed service: exit %d: %s", code, out)
	}
	must("route/demo/greeter deleted (revision 4)", "delete", "route", "greeter", "-n", "demo")
	must("service/demo/greeter deleted", "delete", "service", "greeter", "-n", "demo")
	out = must("NAMESPACE", "get", "services")
	if strings.Contains(out, "greeter") {
		t.Fatalf("deleted service still listed:\n%s", out)
	}
}
