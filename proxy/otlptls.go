package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
)

// maxOTLPPEM bounds one PEM file of the exporter's TLS material: a file
// swapped for something else by mistake is refused, not read whole.
const maxOTLPPEM = 1 << 20

// OTLPTLS is the exporter's TLS material, read from PEM files at
// start-up and read again, before an export, when a file has changed
// (another inode, size or modification time), so a rotated client
// certificate, key or CA takes effect without a restart. A file that
// cannot be used then is logged once per change and the last good
// material stays in force. It is safe for concurrent use.
type OTLPTLS struct {
	caFile, certFile, keyFile string

	mu sync.Mutex
	// seen is the state of each file when last read (nil: missing).
	seen    [3]os.FileInfo
	started bool
	roots   *x509.CertPool
	cert    *tls.Certificate
}

// OTLPTLSConfig reads the exporter's TLS material from PEM files: caFile
// (OTEL_EXPORTER_OTLP_CERTIFICATE) replaces the system roots, certFile
// and keyFile (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE, _CLIENT_KEY) are the
// client certificate, both or neither. All empty is nil. Each file must be
// usable now; later changes are picked up as OTLPTLS says.
func OTLPTLSConfig(caFile, certFile, keyFile string) (*OTLPTLS, error) {
	if caFile == "" && certFile == "" && keyFile == "" {
		return nil, nil
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("otlp client certificate and client key go together")
	}
	s := &OTLPTLS{caFile: caFile, certFile: certFile, keyFile: keyFile}
	if _, err := s.refresh(); err != nil {
		return nil, err
	}
	return s, nil
}

// config is the client TLS configuration for a collector at host (a name
// or an IP address, as in the endpoint). Both callbacks read the material
// in force at each handshake, so new connections follow a rotation. With
// a CA file the server's chain is verified here, against the current
// roots and host, since tls.Config's own RootCAs cannot change.
func (s *OTLPTLS) config(host string) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if s == nil {
		return cfg
	}
	if s.certFile != "" {
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			s.mu.Lock()
			defer s.mu.Unlock()
			return s.cert, nil
		}
	}
	if s.caFile != "" {
		cfg.InsecureSkipVerify = true // verified by VerifyConnection, below
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("otlp collector sent no certificate")
			}
			s.mu.Lock()
			roots := s.roots
			s.mu.Unlock()
			opts := x509.VerifyOptions{Roots: roots, DNSName: host, Intermediates: x509.NewCertPool()}
			for _, c := range cs.PeerCertificates[1:] {
				opts.Intermediates.AddCert(c)
			}
			if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
				return fmt.Errorf("otlp collector certificate: %w", err)
			}
			return nil
		}
	}
	return cfg
}

// reload reads the files again if any has changed since, logging what it
// took or why it kept the last good material; it reports whether new
// material is in force.
func (s *OTLPTLS) reload(log *slog.Logger) bool {
	if s == nil {
		return false
	}
	changed, err := s.refresh()
	if err != nil {
		log.Error("otlp tls: a changed file cannot be used; keeping the last good certificates", "error", err)
	}
	if changed {
		log.Info("otlp tls: certificates reloaded", "ca_file", s.caFile, "client_cert", s.certFile)
	}
	return changed
}

// refresh reads the files that changed since they were last read. A
// change that cannot be used is not read again until the file changes
// again.
func (s *OTLPTLS) refresh() (changed bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	if s.caFile != "" && s.stale(0, s.caFile) {
		b, err := readPEM(s.caFile)
		pool := x509.NewCertPool()
		if err == nil && !pool.AppendCertsFromPEM(b) {
			err = fmt.Errorf("%s: no PEM certificate", s.caFile)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("otlp certificate: %w", err))
		} else {
			s.roots, changed = pool, true
		}
	}
	certStale, keyStale := s.certFile != "" && s.stale(1, s.certFile), s.keyFile != "" && s.stale(2, s.keyFile)
	if certStale || keyStale {
		cb, err := readPEM(s.certFile)
		var kb []byte
		if err == nil {
			kb, err = readPEM(s.keyFile)
		}
		var cert tls.Certificate
		if err == nil {
			cert, err = tls.X509KeyPair(cb, kb)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("otlp client certificate %s, key %s: %w", s.certFile, s.keyFile, err))
		} else {
			s.cert, changed = &cert, true
		}
	}
	s.started = true
	return changed, errors.Join(errs...)
}

// stale records file i's state and reports whether it differs from the
// one last recorded; everything is stale at the first read. Called with
// s.mu held.
func (s *OTLPTLS) stale(i int, name string) bool {
	fi, err := os.Stat(name)
	if err != nil {
		fi = nil
	}
	old := s.seen[i]
	s.seen[i] = fi
	switch {
	case !s.started:
		return true
	case fi == nil || old == nil:
		return (fi == nil) != (old == nil)
	}
	return !os.SameFile(fi, old) || fi.Size() != old.Size() || !fi.ModTime().Equal(old.ModTime())
}

// readPEM reads a PEM file of at most maxOTLPPEM bytes.
func readPEM(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxOTLPPEM+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(b) > maxOTLPPEM {
		return nil, fmt.Errorf("%s: larger than %d bytes", name, maxOTLPPEM)
	}
	return b, nil
}
