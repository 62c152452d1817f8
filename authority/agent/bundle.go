package agent

import (
	"bytes"
	"errors"
	"fmt"
	"os"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// maxBundleFile bounds the bootstrap bundle file.
const maxBundleFile = 1 << 20

// LoadTrustBundle reads the bootstrap trust bundle from path: either the
// SPIFFE bundle JSON that writd serves at /bundle, or PEM certificates.
func LoadTrustBundle(path string, td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("trust bundle: %w", err)
	}
	if fi.Size() > maxBundleFile {
		return nil, fmt.Errorf("trust bundle %s: larger than %d bytes", path, maxBundleFile)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("trust bundle: %w", err)
	}
	return ParseTrustBundle(b, td)
}

// ParseTrustBundle parses SPIFFE bundle JSON or PEM certificates and
// requires at least one X.509 authority.
func ParseTrustBundle(b []byte, td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	trimmed := bytes.TrimSpace(b)
	var (
		bundle *spiffebundle.Bundle
		err    error
	)
	switch {
	case bytes.HasPrefix(trimmed, []byte("{")):
		bundle, err = spiffebundle.Parse(td, trimmed)
		if err != nil {
			return nil, fmt.Errorf("trust bundle (SPIFFE JSON): %w", err)
		}
	case bytes.HasPrefix(trimmed, []byte("-----BEGIN")):
		xb, err := x509bundle.Parse(td, trimmed)
		if err != nil {
			return nil, fmt.Errorf("trust bundle (PEM): %w", err)
		}
		bundle = spiffebundle.FromX509Bundle(xb)
	default:
		return nil, errors.New("trust bundle: want SPIFFE bundle JSON or PEM certificates")
	}
	if len(bundle.X509Authorities()) == 0 {
		return nil, errors.New("trust bundle: no X.509 authorities")
	}
	return bundle, nil
}
