package config

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

func TestDecodeMeshFile(t *testing.T) {
	data, err := os.ReadFile("testdata/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rs, err := DecodeMesh("mesh.yaml", data)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(rs), 4; got != want {
		t.Fatalf("got %d resources, want %d", got, want)
	}
	if err := CheckMesh(rs); err != nil {
		t.Fatalf("CheckMesh: %v", err)
	}
	route := rs[1].Spec.(*RouteSpec)
	if got := route.Rules[0].Destinations[1].Weight; got != 20 {
		t.Fatalf("weight = %d, want 20", got)
	}
	// JSON round trip keeps every field and rejects unknown ones.
	b, err := json.Marshal(rs[1])
	if err != nil {
		t.Fatal(err)
	}
	var back Resource
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	b2, _ := json.Marshal(&back)
	if string(b) != string(b2) {
		t.Fatalf("round trip:\n%s\n%s", b, b2)
	}
	if err := json.Unmarshal([]byte(`{"apiVersion":"writ.dev/v1alpha1","kind":"Route","metadata":{"name":"x"},"spec":{"bogus":1}}`), &back); err == nil {
		t.Fatal("unknown JSON field accepted")
	}
	y, err := MarshalYAMLDoc(rs)
	if err != nil {
		t.Fatal(err)
	}
	again, err := DecodeMesh("again.yaml", y)
	if err != nil {
		t.Fatalf("re-decoding marshalled YAML: %v\n%s", err, y)
	}
	if len(again) != 4 {
		t.Fatalf("re-decoded %d resources", len(again))
	}
}

const svc = `apiVersion: writ.dev/v1alpha1
kind: Service
metadata: {name: a}
spec:
  ports: [{port: 80, protocol: http}]
  subsets: [{name: v1, labels: {version: v1}}]
`

// routeMatch is a Route document for service a whose one rule has match m
// (on line 14 after svc).
func routeMatch(m string) string {
	return "---\napiVersion: writ.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: a\n  rules:\n    - match: " + m + "\n      destinations: [{subset: v1}]\n"
}

func TestDecodeMeshErrors(t *testing.T) {
	tests := []struct {
		name, yaml string
		want       []string // substrings of the error, in order
	}{
		{"unknown field", "apiVersion: writ.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80, protocol: http}]\n  colour: red\n",
			[]string{"f.yaml:6: spec.colour: field colour not found"}},
		{"unknown field in second document", svc + "---\napiVersion: writ.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: a\n  rules:\n    - destinations: [{subset: v1}]\n      tiemout: 2s\n",
			[]string{"f.yaml:15: spec.rules[0].tiemout: field tiemout not found"}},
		{"unknown field in a flow mapping", "apiVersion: writ.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80, protocol: http, colour: red}]\n",
			[]string{"f.yaml:5: spec.ports[0].colour: field colour not found"}},
		{"missing kind", "apiVersion: writ.dev/v1alpha1\nmetadata: {name: a}\n", []string{"f.yaml:1: kind: missing kind"}},
		{"unknown kind", "apiVersion: writ.dev/v1alpha1\nkind: Gateway\n", []string{"f.yaml:2: kind: unknown kind \"Gateway\""}},
		{"bad apiVersion", strings.Replace(svc, "v1alpha1", "v9", 1), []string{"f.yaml:1: apiVersion: unsupported apiVersion"}},
		{"wrong type", "apiVersion: writ.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: eighty, protocol: http}]\n",
			[]string{"f.yaml:5:", "cannot unmarshal"}},
		{"bad protocol", "apiVersion: writ.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n    - port: 80\n      protocol: udp\n",
			[]string{"f.yaml:7: spec.ports[0].protocol: unknown protocol \"udp\""}},
		{"split not 100", svc + "---\napiVersion: writ.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: a\n  rules:\n    - destinations:\n        - {subset: v1, weight: 70}\n        - {subset: v1, weight: 20}\n",
			[]string{"f.yaml:14: spec.rules[0].destinations: weights sum to 90, want 100"}},
		{"bad duration", svc + "---\napiVersion: writ.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: a\n  rules:\n    - destinations: [{subset: v1}]\n      timeout: soon\n",
			[]string{"f.yaml:15:", "not a duration"}},
		{"bad yaml syntax", "apiVersion: writ.dev/v1alpha1\nkind: Service\n  metadata: [\n", []string{"f.yaml:3:"}},
		{"ring hash needs key", "apiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  loadBalancer:\n    policy: ring_hash\n",
			[]string{"f.yaml:6: spec.loadBalancer: ring_hash hashes on exactly one"}},
		{"bad mode", "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  package: writ.authz\n  mode: maybe\n",
			[]string{"f.yaml:7: spec.mode: mode \"maybe\""}},
		{"request body without maxBytes", "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  package: writ.authz\n  mode: enforce\n  requestBody:\n    allowPartialMessage: true\n",
			[]string{"f.yaml:8: spec.requestBody.maxBytes: 0: want 1 to 4194304"}},
		{"request body too large", "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  package: writ.authz\n  mode: enforce\n  requestBody: {maxBytes: 4194305}\n",
			[]string{"f.yaml:8: spec.requestBody.maxBytes: 4194305: want 1 to 4194304"}},
		{"request body unknown field", "apiVersion: writ.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  package: writ.authz\n  mode: enforce\n  requestBody: {maxBytes: 1024, partial: true}\n",
			[]string{"f.yaml:8:", "partial"}},
		{"outlier detection detects nothing", "apiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  outlierDetection:\n    baseEjectionTime: 30s\n",
			[]string{"spec.outlierDetection.consecutive5xx: set consecutive5xx, consecutiveGatewayFailure"}},
		{"interval detectors enforced nowhere", "apiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  outlierDetection: {enforcingSuccessRate: 0, failurePercentageThreshold: 50}\n",
			[]string{"spec.outlierDetection.consecutive5xx: set consecutive5xx, consecutiveGatewayFailure (at least 1), enforcingSuccessRate or enforcingFailurePercentage"}},
		{"interval detector bounds", "apiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  outlierDetection: {enforcingSuccessRate: 101, enforcingFailurePercentage: 50, failurePercentageThreshold: -1,\n" +
			"    successRateMinimumHosts: 0, successRateRequestVolume: 0, successRateStdevFactor: 0, failurePercentageMinimumHosts: -2, failurePercentageRequestVolume: 0}\n",
			[]string{"spec.outlierDetection.enforcingSuccessRate: 101 is out of range 0-100", "failurePercentageThreshold: -1 is out of range 0-100",
				"successRateMinimumHosts: must be at least 1", "successRateRequestVolume: must be at least 1", "successRateStdevFactor: must be at least 1",
				"failurePercentageMinimumHosts: must be at least 1", "failurePercentageRequestVolume: must be at least 1"}},
		{"interval detector count too large", "apiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  outlierDetection: {enforcingSuccessRate: 100, successRateRequestVolume: 4294967296}\n",
			[]string{"spec.outlierDetection.successRateRequestVolume: must be at most 2147483647"}},
		{"max ejection time below base", "apiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  outlierDetection: {consecutiveGatewayFailure: 3, baseEjectionTime: 30s, maxEjectionTime: 10s}\n",
			[]string{"spec.outlierDetection.maxEjectionTime: must not be shorter"}},
		{"empty", "", []string{"f.yaml: no resources"}},
		// What writ-proxy would NACK is refused here, with the same bounds.
		{"path regex syntax", svc + routeMatch("{pathRegex: \"/a(b\"}"),
			[]string{"f.yaml:14: spec.rules[0].match.pathRegex: regex \"/a(b\": missing closing )"}},
		{"path regex too long", svc + routeMatch("{pathRegex: \"/"+strings.Repeat("a", 1024)+"\"}"),
			[]string{"f.yaml:14: spec.rules[0].match.pathRegex: regex is 1025 bytes, more than 1024"}},
		{"path regex program too large", svc + routeMatch("{pathRegex: \"/[a-z]{1000}[0-9]{1000}x{1000}y{1000}z{1000}\"}"),
			[]string{"f.yaml:14: spec.rules[0].match.pathRegex: regex \"/[a-z]{1000}", "instructions, more than 4096"}},
		{"header regex program too large", svc + routeMatch("{headers: [{name: x-id, regex: \"(ab|cd){1000}(ef|gh){1000}\"}]}"),
			[]string{"f.yaml:14: spec.rules[0].match.headers[0].regex: regex", "instructions, more than 4096"}},
		{"pseudo-header", svc + routeMatch("{headers: [{name: \":path\", exact: /x}]}"),
			[]string{"f.yaml:14: spec.rules[0].match.headers[0].name: \":path\": only the :method and :authority pseudo-headers"}},
		{"header name not a token", svc + routeMatch("{headers: [{name: \"x id\", exact: a}]}"),
			[]string{"f.yaml:14: spec.rules[0].match.headers[0].name: \"x id\" is not an HTTP header name"}},
		{"hash header not a token", "apiVersion: writ.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  service: a\n  loadBalancer:\n    policy: ring_hash\n    hashHeader: \"x:user\"\n",
			[]string{"f.yaml:8: spec.loadBalancer.hashHeader: \"x:user\" is not an HTTP header name"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeMesh("f.yaml", []byte(tt.yaml))
			if err == nil {
				t.Fatal("got no error")
			}
			msg := err.Error()
			rest := msg
			for _, w := range tt.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("error %q lacks %q", msg, w)
				}
				rest = rest[i+len(w):]
			}
		})
	}
}

func TestCheckMesh(t *testing.T) {
	route := func(name, service, body string) string {
		return "---\napiVersion: writ.dev/v1alpha1\nkind: Route\nmetadata: {name: " + name + "}\nspec:\n  service: " + service + "\n  rules:\n" + body
	}
	svcB := "---\napiVersion: writ.dev/v1alpha1\nkind: Service\nmetadata: {name: b}\nspec:\n  ports: [{port: 80, protocol: http}]\n"
	tests := []struct {
		name, yaml, want string
	}{
		{"ok", svc + route("r", "a", "    - destinations: [{subset: v1}]\n"), ""},
		{"unknown subset", svc + route("r", "a", "    - destinations: [{subset: v3}]\n"),
			"f.yaml:14: spec.rules[0].destinations[0].subset: service a.default has no subset \"v3\" (it declares v1)"},
		{"unknown service", svc + route("r", "nope", "    - destinations: [{subset: v1}]\n"),
			"f.yaml:12: spec.service: service \"nope\" is not declared"},
		{"mirror to unknown subset", svc + route("r", "a", "    - destinations: [{subset: v1}]\n      mirror: {subset: v2, percent: 10}\n"),
			"spec.rules[0].mirror.subset: service a.default has no subset \"v2\""},
		{"loop", svc + svcB + route("ra", "a", "    - destinations: [{service: b}]\n") + route("rb", "b", "    - destinations: [{service: a}]\n"),
			"routing loop: a.default -> b.default -> a.default"},
		{"duplicate", svc + "---\n" + svc, "Service/default/a is declared twice (also in f.yaml:1)"},
		{"two routes", svc + route("r1", "a", "    - destinations: [{subset: v1}]\n") + route("r2", "a", "    - destinations: [{subset: v1}]\n"),
			"service a.default already has Route r1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, err := DecodeMesh("f.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			err = CheckMesh(rs)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("got %v, want no error", err)
			case tt.want != "" && err == nil:
				t.Fatalf("got no error, want %q", tt.want)
			case tt.want != "" && !strings.Contains(err.Error(), tt.want):
				t.Fatalf("got %q, want %q", err, tt.want)
			}
		})
	}
}

func TestKindOf(t *testing.T) {
	for in, want := range map[string]string{"route": KindRoute, "routes": KindRoute, "Service": KindService, "trafficpolicy": KindTrafficPolicy, "trafficpolicies": KindTrafficPolicy, "authorizationpolicy": KindAuthorizationPolicy} {
		if got, ok := KindOf(in); !ok || got != want {
			t.Errorf("KindOf(%q) = %q, %v; want %q", in, got, ok, want)
		}
	}
	if _, ok := KindOf("gateway"); ok {
		t.Error("KindOf(gateway) resolved")
	}
}
