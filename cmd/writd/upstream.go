package main

import (
	"log/slog"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/authority/upstream/stepca"
	"github.com/writmesh/writ/config"
)

// newUpstream builds the upstream signer the config names. step-ca is the
// only kind today; config validation has made sure it is set.
func newUpstream(u *config.Upstream, log *slog.Logger) (authority.UpstreamSigner, error) {
	return stepca.New(*u.StepCA, stepca.Options{Logger: log})
}
