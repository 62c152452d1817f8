package agent

// Log field names, in one place so that logs stay greppable across
// releases. Values logged under them never include keys, tokens or CSRs.
const (
	logError           = "error"
	logSPIFFEID        = "spiffe_id"
	logEntryID         = "entry_id"
	logNodeID          = "node_id"
	logRetryIn         = "retry_in"
	logExpiresAt       = "expires_at"
	logSequence        = "sequence"
	logHaveSequence    = "have_sequence"
	logX509Authorities = "x509_authorities"
	logJWTAuthorities  = "jwt_authorities"
	logPID             = "pid"
	logUID             = "uid"
)
