package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/xds"
)

func init() {
	commands["apply"] = (*cli).meshApply
	commands["diff"] = (*cli).meshDiff
	commands["get"] = (*cli).meshGet
	commands["delete"] = (*cli).meshDelete
	commands["history"] = (*cli).meshHistory
	commands["rollback"] = (*cli).meshRollback
	commands["mesh nodes"] = (*cli).meshNodes
	commands["mesh endpoints"] = (*cli).meshEndpoints
	commands["mesh bootstrap"] = (*cli).meshBootstrap
}

// meshBootstrap prints a grpc-go xDS bootstrap for a proxyless workload.
// It needs no writd: everything it writes comes from its flags.
func (c *cli) meshBootstrap(_ context.Context, args []string) error {
	fs := c.flags("mesh bootstrap")
	var o xds.GRPCBootstrapOptions
	fs.StringVar(&o.ServerURI, "xds-server", "", "writd's gRPC address, host:port (required)")
	fs.StringVar(&o.NodeID, "node-id", "", "this workload instance's node id (required)")
	fs.StringVar(&o.Namespace, "namespace", "", "the workload's namespace, as in its SPIFFE ID (required)")
	fs.StringVar(&o.CertFile, "cert", "", "SVID certificate chain file, PEM (required)")
	fs.StringVar(&o.KeyFile, "key", "", "SVID private key file, PEM (required)")
	fs.StringVar(&o.CAFile, "ca", "", "trust bundle file, PEM (required)")
	fs.StringVar(&o.BundleMapFile, "bundle-map", "", "trust bundle as a SPIFFE bundle map, JSON (required)")
	fs.StringVar(&o.Service, "service", "", "the service this workload serves (its service account); omit for clients")
	fs.StringVar(&o.Address, "address", "", "the IP it serves on")
	var ports, labels multiFlag
	fs.Var(&ports, "port", "a port it serves on, repeatable")
	fs.Var(&labels, "label", "a label KEY=VALUE subsets select by, repeatable")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	for _, p := range ports {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("--port %q is not a port", p)
		}
		o.Ports = append(o.Ports, n)
	}
	o.Labels = map[string]string{}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return fmt.Errorf("--label %q: want KEY=VALUE", l)
		}
		o.Labels[k] = v
	}
	b, err := xds.GRPCBootstrap(o)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(c.stdout, "%s\n", b)
	return err
}

func (c *cli) meshNodes(ctx context.Context, args []string) error {
	fs := c.flags("mesh nodes")
	output := fs.String("o", "table", "output: table or json")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	var list xds.NodeList
	if err := c.client.Do(ctx, http.MethodGet, "/v1/mesh/nodes", nil, &list); err != nil {
		return err
	}
	if *output == "json" {
		return printJSON(c.stdout, list.Nodes)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSPIFFE ID\tVERSION\tACKED\tLAST ERROR")
	for _, n := range list.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n.NodeID, n.SPIFFEID, n.Version, n.Acked, n.LastError)
	}
	return tw.Flush()
}

func (c *cli) meshEndpoints(ctx context.Context, args []string) error {
	if _, err := parse(c.flags("mesh endpoints"), args, 0); err != nil {
		return err
	}
	var eps []xds.Endpoint
	if err := c.client.Do(ctx, http.MethodGet, "/v1/mesh/endpoints", nil, &eps); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSERVICE\tADDRESS\tPORTS\tLABELS\tSPIFFE ID")
	for _, e := range eps {
		var labels []string
		for k, v := range e.Labels {
			labels = append(labels, k+"="+v)
		}
		sort.Strings(labels)
		fmt.Fprintf(tw, "%s\t%s.%s\t%s\t%v\t%s\t%s\n", e.NodeID, e.Service, e.Namespace, e.Address, e.Ports, strings.Join(labels, ","), e.SPIFFEID)
	}
	return tw.Flush()
}

// maxMeshFile bounds one YAML file read by apply and diff.
const maxMeshFile = 1 << 20

// maxApplyBody leaves room for JSON escaping under the admin API's 64 KiB
// request limit.
const maxApplyBody = 56 << 10

// readSources reads FILE, or every *.yaml and *.yml in DIR (not
// recursive), in name order.
func readSources(path string) ([]xds.SourceFile, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	paths := []string{path}
	if fi.IsDir() {
		paths = nil
		entries, err := os.ReadDir(path)
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			if !e.IsDir() && (strings.HasSuffix(e.Name(), ".yaml") || strings.HasSuffix(e.Name(), ".yml")) {
				paths = append(paths, filepath.Join(path, e.Name()))
			}
		}
		sort.Strings(paths)
		if len(paths) == 0 {
			return nil, fmt.Errorf("%s: no .yaml or .yml files", path)
		}
	}
	var out []xds.SourceFile
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		buf := make([]byte, maxMeshFile+1)
		n, _ := f.Read(buf)
		for n < len(buf) {
			m, err := f.Read(buf[n:])
			n += m
			if err != nil || m == 0 {
				break
			}
		}
		f.Close()
		if n > maxMeshFile {
			return nil, fmt.Errorf("%s is larger than %d bytes", p, maxMeshFile)
		}
		out = append(out, xds.SourceFile{Name: p, Content: string(buf[:n])})
	}
	return out, nil
}

func (c *cli) sendApply(ctx context.Context, name string, args []string, dryRun bool) (*xds.ApplyResponse, error) {
	fs := c.flags(name)
	file := fs.String("f", "", "a YAML file or a directory of them (required)")
	if _, err := parse(fs, args, 0); err != nil {
		return nil, err
	}
	if *file == "" {
		fmt.Fprintf(c.stderr, "writ %s: -f FILE|DIR is required\n", name)
		return nil, errUsage
	}
	files, err := readSources(*file)
	if err != nil {
		return nil, err
	}
	total := 0
	for _, f := range files {
		total += len(f.Content) + len(f.Name)
	}
	if total > maxApplyBody {
		// The admin API bounds request bodies at 64 KiB; say so plainly
		// rather than let the server cut the request off.
		return nil, fmt.Errorf("%s: %d bytes of YAML is more than one apply takes (%d); apply it in parts", *file, total, maxApplyBody)
	}
	var resp xds.ApplyResponse
	if err := c.client.Do(ctx, http.MethodPost, "/v1/mesh/apply", xds.ApplyRequest{Files: files, DryRun: dryRun}, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

func (c *cli) meshApply(ctx context.Context, args []string) error {
	resp, err := c.sendApply(ctx, "apply", args, false)
	if err != nil {
		return err
	}
	for _, ch := range resp.Changes {
		rev := ""
		if ch.Revision > 0 {
			rev = fmt.Sprintf(" (revision %d)", ch.Revision)
		}
		fmt.Fprintf(c.stdout, "%s/%s/%s %s%s\n", strings.ToLower(ch.Kind), ch.Namespace, ch.Name, ch.Op, rev)
	}
	return nil
}

func (c *cli) meshDiff(ctx context.Context, args []string) error {
	resp, err := c.sendApply(ctx, "diff", args, true)
	if err != nil {
		return err
	}
	for _, ch := range resp.Changes {
		fmt.Fprintf(c.stdout, "%s/%s/%s: %s\n", strings.ToLower(ch.Kind), ch.Namespace, ch.Name, map[string]string{
			"created": "would be created", "updated": "would be updated", "unchanged": "unchanged"}[ch.Op])
		if ch.Op != "unchanged" {
			fmt.Fprint(c.stdout, ch.Diff)
		}
	}
	return nil
}

// kindNameArgs parses KIND NAME [-n NS] style commands.
func (c *cli) kindNameArgs(name string, args []string, extra func(*flag.FlagSet)) (kind, ns, res string, err error) {
	fs := c.flags(name)
	nsFlag := fs.String("n", config.DefaultNamespace, "namespace")
	if extra != nil {
		extra(fs)
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return "", "", "", err
	}
	if len(pos) != 2 {
		fmt.Fprintf(c.stderr, "writ %s: want KIND NAME\n", name)
		return "", "", "", errUsage
	}
	k, ok := config.KindOf(pos[0])
	if !ok {
		return "", "", "", fmt.Errorf("unknown kind %q (want one of %s)", pos[0], strings.Join(config.Kinds, ", "))
	}
	return k, *nsFlag, pos[1], nil
}

// parseInterleaved lets flags come before or after positional arguments.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, errUsage
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func (c *cli) meshGet(ctx context.Context, args []string) error {
	fs := c.flags("get")
	ns := fs.String("n", "", "namespace (default: all)")
	output := fs.String("o", "table", "output: table, yaml or json")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) < 1 || len(pos) > 2 {
		fmt.Fprintln(c.stderr, "writ get: want KIND [NAME]")
		return errUsage
	}
	kind, ok := config.KindOf(pos[0])
	if !ok {
		return fmt.Errorf("unknown kind %q (want one of %s)", pos[0], strings.Join(config.Kinds, ", "))
	}
	var rs []*config.Resource
	if len(pos) == 2 {
		namespace := *ns
		if namespace == "" {
			namespace = config.DefaultNamespace
		}
		var r config.Resource
		if err := c.client.Do(ctx, http.MethodGet, "/v1/mesh/resources/"+kind+"/"+url.PathEscape(namespace)+"/"+url.PathEscape(pos[1]), nil, &r); err != nil {
			return err
		}
		rs = []*config.Resource{&r}
	} else {
		q := url.Values{"kind": {kind}}
		if *ns != "" {
			q.Set("namespace", *ns)
		}
		var list xds.ResourceList
		if err := c.client.Do(ctx, http.MethodGet, "/v1/mesh/resources?"+q.Encode(), nil, &list); err != nil {
			return err
		}
		rs = list.Resources
	}
	switch *output {
	case "yaml":
		b, err := config.MarshalYAMLDoc(rs)
		if err != nil {
			return err
		}
		_, err = c.stdout.Write(b)
		return err
	case "json":
		if len(pos) == 2 {
			return printJSON(c.stdout, rs[0])
		}
		return printJSON(c.stdout, rs)
	case "table":
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAMESPACE\tNAME\tSUMMARY")
		for _, r := range rs {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Metadata.Namespace, r.Metadata.Name, summary(r))
		}
		return tw.Flush()
	}
	return fmt.Errorf("unknown output %q: want table, yaml or json", *output)
}

func summary(r *config.Resource) string {
	switch s := r.Spec.(type) {
	case *config.ServiceSpec:
		var ps []string
		for _, p := range s.Ports {
			ps = append(ps, fmt.Sprintf("%d/%s", p.Port, p.Protocol))
		}
		return "ports " + strings.Join(ps, ",") + fmt.Sprintf(", %d subsets", len(s.Subsets))
	case *config.RouteSpec:
		return fmt.Sprintf("service %s, %d rules", s.Service, len(s.Rules))
	case *config.TrafficPolicySpec:
		return "service " + s.Service
	case *config.AuthorizationPolicySpec:
		return fmt.Sprintf("service %s, package %s, %s", s.Service, s.Package, s.Mode)
	}
	return ""
}

func (c *cli) meshDelete(ctx context.Context, args []string) error {
	kind, ns, name, err := c.kindNameArgs("delete", args, nil)
	if err != nil {
		return err
	}
	var ch xds.Change
	if err := c.client.Do(ctx, http.MethodDelete, "/v1/mesh/resources/"+kind+"/"+url.PathEscape(ns)+"/"+url.PathEscape(name), nil, &ch); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "%s/%s/%s deleted (revision %d)\n", strings.ToLower(kind), ns, name, ch.Revision)
	return nil
}

func (c *cli) meshHistory(ctx context.Context, args []string) error {
	var output *string
	kind, ns, name, err := c.kindNameArgs("history", args, func(fs *flag.FlagSet) {
		output = fs.String("o", "table", "output: table or json")
	})
	if err != nil {
		return err
	}
	var h xds.HistoryResponse
	if err := c.client.Do(ctx, http.MethodGet, "/v1/mesh/history/"+kind+"/"+url.PathEscape(ns)+"/"+url.PathEscape(name), nil, &h); err != nil {
		return err
	}
	if *output == "json" {
		return printJSON(c.stdout, h.Revisions)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REVISION\tOP\tAUTHOR\tAT")
	for _, r := range h.Revisions {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", r.Revision, r.Op, r.Author, r.At.Local().Format(time.RFC3339))
	}
	return tw.Flush()
}

func (c *cli) meshRollback(ctx context.Context, args []string) error {
	var to *int64
	kind, ns, name, err := c.kindNameArgs("rollback", args, func(fs *flag.FlagSet) {
		to = fs.Int64("to", 0, "the revision to bring back (required)")
	})
	if err != nil {
		return err
	}
	if *to <= 0 {
		fmt.Fprintln(c.stderr, "writ rollback: --to REV is required")
		return errUsage
	}
	var ch xds.Change
	if err := c.client.Do(ctx, http.MethodPost, "/v1/mesh/rollback/"+kind+"/"+url.PathEscape(ns)+"/"+url.PathEscape(name), xds.RollbackRequest{Revision: *to}, &ch); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "%s/%s/%s rolled back to revision %d as revision %d\n", strings.ToLower(kind), ns, name, *to, ch.Revision)
	return nil
}
