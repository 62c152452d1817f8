package cliflags

import (
	"bytes"
	"flag"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	run := func(args ...string) (bool, int, string, string) {
		fs := flag.NewFlagSet("x", flag.ContinueOnError)
		fs.SetOutput(new(bytes.Buffer))
		fs.String("addr", "", "where to listen")
		var out, errb bytes.Buffer
		done, code := Parse(fs, "x", "x: usage\n", args, &out, &errb)
		return done, code, out.String(), errb.String()
	}
	if done, code, _, _ := run("--addr", "a"); done || code != 0 {
		t.Fatalf("good flags: done=%v code=%d", done, code)
	}
	if done, code, out, _ := run("--help"); !done || code != 0 || !strings.HasPrefix(out, "x: usage\n") || !strings.Contains(out, "where to listen") {
		t.Fatalf("--help: done=%v code=%d out=%q", done, code, out)
	}
	if done, code, _, errs := run("--nope"); !done || code != 2 || errs != "x: see --help\n" {
		t.Fatalf("bad flag: done=%v code=%d err=%q", done, code, errs)
	}
	if done, code, _, errs := run("stray"); !done || code != 2 || !strings.Contains(errs, "unexpected arguments: stray") {
		t.Fatalf("stray argument: done=%v code=%d err=%q", done, code, errs)
	}
}
