// Command writ is Writ's command-line interface. Until OIDC login exists it
// talks to writd's admin API over the local admin socket, whose file
// permissions authenticate the caller.
package main

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/writmesh/writ/api/admin"
	"github.com/writmesh/writ/config"
)

const usage = `writ is Writ's command-line interface.

Usage:
  writ token create --spiffe-id spiffe://TD/node/NAME [--ttl 10m]
  writ entry create --parent spiffe://TD/node/NAME --spiffe-id spiffe://TD/ns/NS/sa/SA --selector unix:uid:1000 [--selector ...] [--x509-ttl 1h] [--jwt-ttl 5m]
  writ entry list [-o table|json]
  writ entry show ID
  writ entry delete ID
  writ bundle show [--format spiffe|pem]
  writ ca rotate-root [--no-wait] [--poll 5s]
  writ ca status
  writ cert list [--limit 50] [-o table|json]
  writ whoami
  writ policy test DIR... [-v] [--coverage]       (local: runs *_test.rego; exit 1 on failure)
  writ policy eval --policy DIR --input FILE [--decision data.envoy.authz.allow] [--explain notes|fails|full]
  writ policy diff --candidate DIR [--since 24h] [--decision data.envoy.authz.allow] [--examples 10] [--max-events 100000] [--format table|json] [--fail-on-change]
                                                   (local: input is a policy input or an Envoy CheckRequest JSON)
  writ apply -f FILE|DIR                 apply mesh resources (all documents or none)
  writ diff -f FILE|DIR                  show what apply would change
  writ get KIND [NAME] [-n NS] [-o table|yaml|json]
  writ delete KIND NAME [-n NS]
  writ history KIND NAME [-n NS] [-o table|json]
  writ rollback KIND NAME --to REV [-n NS]
    KIND: service, route, trafficpolicy, authorizationpolicy
  writ mesh nodes [-o table|json]        xDS nodes on this writd: versions pushed, ACKed, last NACK
  writ mesh endpoints                    the service registry
  writ mesh bootstrap --xds-server H:P --node-id ID --namespace NS --cert F --key F --ca F --bundle-map F
      [--service S --address IP --port P --label k=v]   print a grpc-go xDS bootstrap
  writ audit verify [--from RFC3339] [--to RFC3339] [-o table|json]
  writ audit query [--source ID] [--destination ID] [--recorder ID] [--result allow|deny] [--kind K] [--since 1h] [--limit 100] [--all] [--format table|json|csv] [--follow]
  writ report generate --from T --to T [--service S] [--namespace NS] [--framework F] [--format json|csv|pdf] -o FILE [--sig FILE.sig]
      [--denied-limit N] [--denied-after CURSOR]   writes FILE and its signature FILE.sig (T: RFC 3339 or YYYY-MM-DD)
  writ report verify FILE [--sig FILE.sig] [--bundle FILE] [--trust-domain TD]

Global flags (before or after the command):
  --admin-socket PATH   writd's admin socket (env WRIT_ADMIN_SOCKET; default ` + config.DefaultAdminSocket + `)
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := runMain(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}

// command runs one `writ NOUN VERB` with the arguments after it.
type command func(c *cli, ctx context.Context, args []string) error

// commands maps "noun verb" (or a lone "noun") to its implementation. Each
// command group registers its own in an init function in its own file.
var commands = map[string]command{
	"token create":   (*cli).tokenCreate,
	"entry create":   (*cli).entryCreate,
	"entry list":     (*cli).entryList,
	"entry show":     (*cli).entryShow,
	"entry delete":   (*cli).entryDelete,
	"bundle show":    (*cli).bundleShow,
	"ca rotate-root": (*cli).rotateRoot,
	"ca status":      (*cli).caStatus,
	"cert list":      (*cli).certList,
	"whoami": func(c *cli, ctx context.Context, _ []string) error {
		return c.whoami(ctx)
	},
}

// cli carries what every command needs.
type cli struct {
	stdout, stderr io.Writer
	client         *admin.Client
}

// errUsage marks a mistake in the command line.
var errUsage = errors.New("usage")

func runMain(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	socket := getenv("WRIT_ADMIN_SOCKET")
	if socket == "" {
		socket = config.DefaultAdminSocket
	}
	// --admin-socket may come anywhere; pull it out first.
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--admin-socket" || a == "-admin-socket":
			if i+1 >= len(args) {
				fmt.Fprintln(stderr, "writ: --admin-socket needs a path")
				return 2
			}
			socket = args[i+1]
			i++
		case strings.HasPrefix(a, "--admin-socket="):
			socket = strings.TrimPrefix(a, "--admin-socket=")
		default:
			rest = append(rest, a)
		}
	}
	if len(rest) == 0 || rest[0] == "help" || rest[0] == "-h" || rest[0] == "--help" {
		fmt.Fprint(stdout, usage)
		if len(rest) == 0 {
			return 2
		}
		return 0
	}
	c := &cli{stdout: stdout, stderr: stderr, client: admin.NewClient(socket)}
	cmd := rest[0]
	sub := ""
	subArgs := rest[1:]
	if len(subArgs) > 0 && !strings.HasPrefix(subArgs[0], "-") {
		sub, subArgs = subArgs[0], subArgs[1:]
	}
	run, ok := commands[strings.TrimSpace(cmd+" "+sub)]
	if !ok && sub != "" {
		// A lone-noun command whose first argument is positional
		// (writ get route NAME).
		if run, ok = commands[cmd]; ok {
			subArgs = rest[1:]
		}
	}
	if !ok {
		fmt.Fprintf(stderr, "writ: unknown command %q\n\n%s", strings.TrimSpace(cmd+" "+sub), usage)
		return 2
	}
	err := run(c, ctx, subArgs)
	if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
		return 2
	}
	if err != nil {
		fmt.Fprintln(stderr, "writ:", err)
		return 1
	}
	return 0
}

func (c *cli) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("writ "+name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string, positional int) ([]string, error) {
	if err := fs.Parse(args); err != nil {
		return nil, errUsage
	}
	if fs.NArg() != positional {
		fmt.Fprintf(fs.Output(), "%s: want %d argument(s), got %d\n", fs.Name(), positional, fs.NArg())
		fs.Usage()
		return nil, errUsage
	}
	return fs.Args(), nil
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func (c *cli) tokenCreate(ctx context.Context, args []string) error {
	fs := c.flags("token create")
	id := fs.String("spiffe-id", "", "node SPIFFE ID the token attests, spiffe://TD/node/NAME (required)")
	ttl := fs.Duration("ttl", 10*time.Minute, "how long the token stays usable")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *id == "" {
		fmt.Fprintln(c.stderr, "writ token create: --spiffe-id is required")
		return errUsage
	}
	var tok admin.Token
	if err := c.client.Do(ctx, http.MethodPost, "/v1/join-tokens", admin.CreateTokenRequest{SPIFFEID: *id, TTL: admin.Duration(ttl.String())}, &tok); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "Token: %s\nSPIFFE ID: %s\nExpires: %s\n", tok.Token, tok.SPIFFEID, tok.ExpiresAt.Local().Format(time.RFC3339))
	return nil
}

func (c *cli) entryCreate(ctx context.Context, args []string) error {
	fs := c.flags("entry create")
	parent := fs.String("parent", "", "node SPIFFE ID the workload runs on (required)")
	id := fs.String("spiffe-id", "", "workload SPIFFE ID, e.g. spiffe://TD/ns/default/sa/web (required)")
	var sels multiFlag
	fs.Var(&sels, "selector", "selector the workload must have, repeatable: unix:uid:N, unix:gid:N, unix:user:NAME, unix:group:NAME, unix:path:/abs/bin (at least one)")
	x509TTL := fs.Duration("x509-ttl", 0, "X.509 SVID lifetime (default: the CA's)")
	jwtTTL := fs.Duration("jwt-ttl", 0, "JWT-SVID lifetime (default: the CA's)")
	output := fs.String("o", "table", "output: table or json")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *parent == "" || *id == "" || len(sels) == 0 {
		fmt.Fprintln(c.stderr, "writ entry create: --parent, --spiffe-id and at least one --selector are required")
		return errUsage
	}
	req := admin.EntryRequest{SPIFFEID: *id, ParentID: *parent, Selectors: sels}
	if *x509TTL != 0 {
		req.X509TTL = admin.Duration(x509TTL.String())
	}
	if *jwtTTL != 0 {
		req.JWTTTL = admin.Duration(jwtTTL.String())
	}
	var e admin.Entry
	if err := c.client.Do(ctx, http.MethodPost, "/v1/entries", req, &e); err != nil {
		return err
	}
	return c.printEntries(*output, []admin.Entry{e})
}

func (c *cli) entryList(ctx context.Context, args []string) error {
	fs := c.flags("entry list")
	output := fs.String("o", "table", "output: table or json")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	var list admin.EntryList
	if err := c.client.Do(ctx, http.MethodGet, "/v1/entries", nil, &list); err != nil {
		return err
	}
	return c.printEntries(*output, list.Entries)
}

func (c *cli) entryShow(ctx context.Context, args []string) error {
	fs := c.flags("entry show")
	output := fs.String("o", "table", "output: table or json")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	var e admin.Entry
	if err := c.client.Do(ctx, http.MethodGet, "/v1/entries/"+pos[0], nil, &e); err != nil {
		return err
	}
	return c.printEntries(*output, []admin.Entry{e})
}

func (c *cli) entryDelete(ctx context.Context, args []string) error {
	pos, err := parse(c.flags("entry delete"), args, 1)
	if err != nil {
		return err
	}
	if err := c.client.Do(ctx, http.MethodDelete, "/v1/entries/"+pos[0], nil, nil); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "Deleted entry %s\n", pos[0])
	return nil
}

func (c *cli) printEntries(format string, entries []admin.Entry) error {
	switch format {
	case "json":
		return printJSON(c.stdout, entries)
	case "table":
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tSPIFFE ID\tPARENT\tSELECTORS\tX509 TTL\tJWT TTL")
		for _, e := range entries {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", e.ID, e.SPIFFEID, e.ParentID, strings.Join(e.Selectors, ","), orDefault(string(e.X509TTL)), orDefault(string(e.JWTTTL)))
		}
		return tw.Flush()
	default:
		return fmt.Errorf("unknown output %q: want table or json", format)
	}
}

func orDefault(s string) string {
	if s == "" {
		return "default"
	}
	return s
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *cli) bundleShow(ctx context.Context, args []string) error {
	fs := c.flags("bundle show")
	format := fs.String("format", "spiffe", "spiffe (SPIFFE bundle JSON, as served at /bundle) or pem (X.509 authorities)")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	var doc []byte
	if err := c.client.Do(ctx, http.MethodGet, "/v1/bundle", nil, &doc); err != nil {
		return err
	}
	switch *format {
	case "spiffe":
		_, err := c.stdout.Write(doc)
		return err
	case "pem":
		b, err := parseAnyBundle(doc)
		if err != nil {
			return err
		}
		for _, cert := range b.X509Authorities() {
			if err := pem.Encode(c.stdout, &pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}); err != nil {
				return err
			}
		}
		return nil
	default:
		return fmt.Errorf("unknown format %q: want spiffe or pem", *format)
	}
}

// parseAnyBundle reads a SPIFFE bundle document without knowing its trust
// domain in advance (the document does not name it).
func parseAnyBundle(doc []byte) (*spiffebundle.Bundle, error) {
	return spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("unknown"), doc)
}

func (c *cli) rotateRoot(ctx context.Context, args []string) error {
	fs := c.flags("ca rotate-root")
	noWait := fs.Bool("no-wait", false, "start the rotation and return; writd finishes it by itself")
	poll := fs.Duration("poll", 5*time.Second, "how often to report progress")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	var st admin.RootRotation
	if err := c.client.Do(ctx, http.MethodPost, "/v1/ca/root-rotation", nil, &st); err != nil {
		return err
	}
	c.printRotation(st)
	if *noWait {
		return nil
	}
	return c.waitRotation(ctx, st, *poll)
}

func (c *cli) caStatus(ctx context.Context, args []string) error {
	if _, err := parse(c.flags("ca status"), args, 0); err != nil {
		return err
	}
	var st admin.RootRotation
	if err := c.client.Do(ctx, http.MethodGet, "/v1/ca/root-rotation", nil, &st); err != nil {
		return err
	}
	c.printRotation(st)
	return nil
}

func (c *cli) certList(ctx context.Context, args []string) error {
	fs := c.flags("cert list")
	limit := fs.Int("limit", 50, "how many of the newest records")
	output := fs.String("o", "table", "output: table or json")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	var list admin.IssuanceList
	if err := c.client.Do(ctx, http.MethodGet, fmt.Sprintf("/v1/issuances?limit=%d", *limit), nil, &list); err != nil {
		return err
	}
	switch *output {
	case "json":
		return printJSON(c.stdout, list.Issuances)
	case "table":
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TIME\tKIND\tOUTCOME\tSPIFFE ID\tSERIAL\tNOT AFTER\tNODE\tREASON")
		for _, is := range list.Issuances {
			na := ""
			if is.NotAfter != nil {
				na = is.NotAfter.Local().Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", is.At.Local().Format(time.RFC3339), is.Kind, is.Outcome, is.SPIFFEID, is.Serial, na, is.NodeID, is.Reason)
		}
		return tw.Flush()
	default:
		return fmt.Errorf("unknown output %q: want table or json", *output)
	}
}

func (c *cli) whoami(ctx context.Context) error {
	var w admin.WhoAmI
	if err := c.client.Do(ctx, http.MethodGet, "/v1/whoami", nil, &w); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "uid %d (pid %d) may use the admin API\n", w.UID, w.PID)
	return nil
}

func (c *cli) printRotation(st admin.RootRotation) {
	ts := func(t *time.Time) string {
		if t == nil {
			return "-"
		}
		return t.Local().Format(time.RFC3339)
	}
	fmt.Fprintf(c.stdout, "Root rotation: %s\n", st.Phase)
	fmt.Fprintf(c.stdout, "  active root:  %s\n", st.ActiveRootID)
	if st.NewRootID != "" {
		fmt.Fprintf(c.stdout, "  old root:     %s\n  new root:     %s\n  started:      %s\n", st.OldRootID, st.NewRootID, ts(st.StartedAt))
	}
	switch st.Phase {
	case "prepared":
		fmt.Fprintf(c.stdout, "  the new root is in the trust bundle and signs nothing yet; it starts signing at %s\n", ts(st.NextStepAt))
	case "switched":
		fmt.Fprintf(c.stdout, "  the new root signs; the old one leaves the bundle at %s, when nothing it signed is valid any more\n", ts(st.NextStepAt))
	case "done":
		fmt.Fprintf(c.stdout, "  completed:    %s\n", ts(st.CompletedAt))
	}
}

// waitRotation polls until the rotation is done, printing each phase
// change. Ctrl-C stops the waiting, not the rotation.
func (c *cli) waitRotation(ctx context.Context, st admin.RootRotation, poll time.Duration) error {
	last := st.Phase
	for st.Phase != "done" {
		select {
		case <-ctx.Done():
			fmt.Fprintln(c.stderr, "writ: stopped waiting; writd carries on with the rotation (see writ ca status)")
			return nil
		case <-time.After(poll):
		}
		if err := c.client.Do(ctx, http.MethodGet, "/v1/ca/root-rotation", nil, &st); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if st.Phase != last {
			c.printRotation(st)
			last = st.Phase
		}
	}
	return nil
}
