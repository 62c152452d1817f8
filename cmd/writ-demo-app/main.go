// Command writ-demo-app is the sample service of `make demo`: one binary
// that plays frontend, orders or payments behind a writ-proxy, and a load
// generator that shows what the mesh did.
//
//	writ-demo-app serve --name orders --version v1 --listen 127.0.0.1:9101 \
//	    --call payments=http://127.0.0.1:15102/charge
//	writ-demo-app load --url http://127.0.0.1:9100/ --requests 200
//
// A served request answers with JSON naming the service and version that
// handled it and, for each --call, what the downstream answered. Nothing
// here knows about identities or policy: the sidecars add mTLS and decide.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "load":
		err = load(os.Args[2:], os.Stdout)
	case "-h", "--help", "help":
		usage()
		return
	default:
		fmt.Fprintf(os.Stderr, "writ-demo-app: unknown command %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "writ-demo-app:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `writ-demo-app: the sample service of make demo

  writ-demo-app serve --name NAME --version V --listen ADDR [--call NAME=URL]... [--fail-every N]
  writ-demo-app load --url URL [--requests N] [--concurrency C]

Run "writ-demo-app serve -h" or "writ-demo-app load -h" for the flags.
`)
}

type calls map[string]string

func (c calls) String() string { return fmt.Sprint(map[string]string(c)) }
func (c calls) Set(v string) error {
	name, url, ok := strings.Cut(v, "=")
	if !ok || name == "" || url == "" {
		return fmt.Errorf("want NAME=URL, got %q", v)
	}
	c[name] = url
	return nil
}

// Answer is what a served request returns.
type Answer struct {
	Service string             `json:"service"`
	Version string             `json:"version"`
	Calls   map[string]*Answer `json:"calls,omitempty"`
	// Status and Error describe a failed downstream call.
	Status int    `json:"status,omitempty"`
	Error  string `json:"error,omitempty"`
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	name := fs.String("name", "", "service name reported in answers")
	version := fs.String("version", "v1", "version reported in answers")
	listen := fs.String("listen", "127.0.0.1:0", "address to serve plain HTTP on (the local sidecar forwards here)")
	failEvery := fs.Int("fail-every", 0, "answer every Nth request with 503, so the caller's sidecar retries (0: never)")
	timeout := fs.Duration("timeout", 5*time.Second, "timeout of each downstream call")
	down := calls{}
	fs.Var(down, "call", "NAME=URL: call URL on every request and include its answer as NAME (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" {
		return errors.New("serve: --name is required")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("service", *name, "version", *version)
	client := &http.Client{Timeout: *timeout}
	var n atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if *failEvery > 0 && n.Add(1)%int64(*failEvery) == 0 {
			log.Info("failing on purpose", "path", r.URL.Path)
			http.Error(w, "demo failure: retry me", http.StatusServiceUnavailable)
			return
		}
		a := Answer{Service: *name, Version: *version}
		if len(down) > 0 {
			a.Calls = map[string]*Answer{}
			for dn, url := range down {
				a.Calls[dn] = call(r.Context(), client, url)
			}
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(a)
	})
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	log.Info("serving", "listen", *listen, "calls", down.String())
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// call asks a downstream service; a refusal by the mesh (403) or a failure
// is part of the answer rather than an error, so the demo can show it.
func call(ctx context.Context, c *http.Client, url string) *Answer {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return &Answer{Error: err.Error()}
	}
	resp, err := c.Do(req)
	if err != nil {
		return &Answer{Error: err.Error()}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return &Answer{Status: resp.StatusCode, Error: strings.TrimSpace(string(body))}
	}
	var a Answer
	if err := json.Unmarshal(body, &a); err != nil {
		return &Answer{Status: resp.StatusCode, Error: "bad answer: " + err.Error()}
	}
	return &a
}

// Tally counts what a load run saw, keyed by what the answers said.
type Tally struct {
	Requests int            `json:"requests"`
	Failed   int            `json:"failed"`
	Outcomes map[string]int `json:"outcomes"`
}

func load(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	url := fs.String("url", "", "URL of the entry service (frontend)")
	requests := fs.Int("requests", 200, "number of requests")
	conc := fs.Int("concurrency", 4, "requests in flight")
	asJSON := fs.Bool("json", false, "print the tally as JSON")
	timeout := fs.Duration("timeout", 10*time.Second, "timeout of each request")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *url == "" {
		return errors.New("load: --url is required")
	}
	if *requests < 1 || *requests > 100000 || *conc < 1 || *conc > 256 {
		return errors.New("load: --requests must be 1..100000 and --concurrency 1..256")
	}
	client := &http.Client{Timeout: *timeout}
	results := make(chan []string, *requests)
	work := make(chan struct{}, *requests)
	for range *requests {
		work <- struct{}{}
	}
	close(work)
	for range *conc {
		go func() {
			for range work {
				results <- outcomes(call(context.Background(), client, *url))
			}
		}()
	}
	t := Tally{Requests: *requests, Outcomes: map[string]int{}}
	for range *requests {
		o := <-results
		if len(o) == 1 && strings.HasPrefix(o[0], "frontend: error") {
			t.Failed++
		}
		for _, k := range o {
			t.Outcomes[k]++
		}
	}
	if *asJSON {
		return json.NewEncoder(out).Encode(t)
	}
	fmt.Fprintf(out, "%d requests\n", t.Requests)
	keys := make([]string, 0, len(t.Outcomes))
	for k := range t.Outcomes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(out, "  %5d  %s\n", t.Outcomes[k], k)
	}
	return nil
}

// outcomes flattens one answer into lines such as "orders v2: ok" or
// "payments: denied (403)".
func outcomes(a *Answer) []string {
	if a.Error != "" {
		return []string{"frontend: " + describe(a)}
	}
	var o []string
	var walk func(a *Answer)
	walk = func(a *Answer) {
		o = append(o, fmt.Sprintf("%s %s: ok", a.Service, a.Version))
		for dn, da := range a.Calls {
			if da.Error != "" {
				o = append(o, fmt.Sprintf("%s -> %s: %s", a.Service, dn, describe(da)))
				continue
			}
			walk(da)
		}
	}
	walk(a)
	return o
}

func describe(a *Answer) string {
	switch {
	case a.Status == http.StatusForbidden:
		return "denied by policy (403)"
	case a.Status != 0:
		return fmt.Sprintf("failed (%d)", a.Status)
	default:
		return "error: " + a.Error
	}
}
