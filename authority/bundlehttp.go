package authority

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

// BundleSource is anything that knows the current trust bundle.
type BundleSource interface {
	Bundle(ctx context.Context) (*spiffebundle.Bundle, error)
}

// BundleHandler serves the trust bundle in SPIFFE bundle format (the
// SPIFFE bundle endpoint's document), with an ETag from its sequence
// number so pollers can ask cheaply whether it changed.
func BundleHandler(src BundleSource, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		b, err := src.Bundle(ctx)
		if err != nil {
			log.Error("serve bundle", "error", err)
			http.Error(w, "bundle unavailable", http.StatusServiceUnavailable)
			return
		}
		doc, err := b.Marshal()
		if err != nil {
			log.Error("marshal bundle", "error", err)
			http.Error(w, "bundle unavailable", http.StatusInternalServerError)
			return
		}
		seq, _ := b.SequenceNumber()
		etag := fmt.Sprintf(`"%d"`, seq)
		w.Header().Set("ETag", etag)
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if hint, ok := b.RefreshHint(); ok && hint > 0 {
			w.Header().Set("Cache-Control", "max-age="+strconv.Itoa(int(hint/time.Second)))
		}
		if r.Header.Get("If-None-Match") == etag {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(doc)
	})
}
