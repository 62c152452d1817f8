// Package cliflags parses a daemon's flags the way every Writ binary
// does: --help prints the usage text and every flag to stdout and exits 0;
// a bad flag or a stray argument gets a one-line hint on stderr and exit 2.
package cliflags

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// Parse parses args into fs. When it returns done, the caller exits with
// code (0 after --help, 2 after an error).
func Parse(fs *flag.FlagSet, name, usage string, args []string, stdout, stderr io.Writer) (done bool, code int) {
	// Parse reports errors itself; the usage is printed here, in full to
	// stdout when asked for and as a hint otherwise.
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usage)
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return true, 0
		}
		fmt.Fprintf(stderr, "%s: see --help\n", name)
		return true, 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected arguments: %s\n", name, strings.Join(fs.Args(), " "))
		return true, 2
	}
	return false, 0
}
