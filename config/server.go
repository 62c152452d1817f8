package config

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"
)

// Server is writd's configuration file (writ.yaml).
type Server struct {
	// TrustDomain is the SPIFFE trust domain this control plane serves.
	TrustDomain string `yaml:"trust_domain"`
	// DatabaseURL is PostgreSQL's URL; WRIT_DATABASE_URL overrides it.
	DatabaseURL string `yaml:"database_url"`
	// ReplicaID names this writd replica in the CA's records; default
	// hostname-pid.
	ReplicaID string `yaml:"replica_id"`
	Listen    Listen `yaml:"listen"`
	Admin     Admin  `yaml:"admin"`
	CA        CA     `yaml:"ca"`
	Log       Log    `yaml:"log"`
	// Decision configures the authorization decision API served on
	// listen.decision.
	Decision Decision `yaml:"decision"`
	// Policy, when set, makes writd serve a policy directory as an OPA
	// bundle to writ-enforcer, writ-proxy and stock OPA.
	Policy *Policy `yaml:"policy"`
	// Audit configures the audit trail writd keeps.
	Audit Audit `yaml:"audit"`
	// Mesh tunes the xDS server and its service registry.
	Mesh Mesh `yaml:"mesh"`
}

// Audit configures writd's side of the audit trail.
type Audit struct {
	// RetentionDays is how long events are kept; older daily partitions
	// are dropped by the retention job. Default 365.
	RetentionDays int `yaml:"retention_days"`
	// MinRetentionDays is the floor retention_days may not go below
	// (default 90: PCI DSS 10.5.1 asks for three months at hand). A
	// shorter retention is refused at startup.
	MinRetentionDays int `yaml:"min_retention_days"`
	// RetentionInterval is how often the retention job runs (default 1h).
	RetentionInterval Duration `yaml:"retention_interval"`
	// RetentionDatabaseURL connects the retention job as its own role,
	// the owner of the partitions, which the application role should not
	// be; WRIT_AUDIT_RETENTION_DATABASE_URL overrides it. Default:
	// database_url (one role for both; writd warns).
	RetentionDatabaseURL string `yaml:"retention_database_url"`
	// Durability of the events writd writes for decision-API answers:
	// fsync-per-event commits each with synchronous_commit on;
	// fsync-grouped (the default) lets PostgreSQL's WAL writer flush
	// them in groups (synchronous_commit off), like a spool's grouped
	// fsync. Changes, issuance and admin calls always commit
	// synchronously with the change they record.
	Durability string `yaml:"durability"`
}

// Mesh tunes the xDS server and the service registry fed by data planes.
type Mesh struct {
	// RegistryGrace is how long a workload stays registered after its
	// last xDS stream ends (a restart within it keeps its endpoint);
	// default 30s.
	RegistryGrace Duration `yaml:"registry_grace"`
	// RegistryStale is how long a registration stays live once the
	// replica holding its stream stops refreshing it (that replica
	// crashed); default 90s, and more than registry_grace, since
	// replicas refresh every half grace period.
	RegistryStale Duration `yaml:"registry_stale"`
	// Resync rebuilds every node's configuration this often even without
	// a change (bundle rotations, missed notifications); default 1m.
	Resync Duration `yaml:"resync"`
}

// Policy configures the bundle service: the directory is served at
// GET /bundles/{bundle_name} over mTLS on listen.decision, to callers the
// admin policy lets read it, and on the plain HTTP listener only with
// plain_http.
type Policy struct {
	// Dir is the policy directory (Rego modules, JSON/YAML data, optional
	// .manifest); it is re-read when its files change.
	Dir string `yaml:"dir"`
	// BundleName names the bundle in its URL; default "mesh".
	BundleName string `yaml:"bundle_name"`
	// PollInterval is how often Dir is checked for changes; default 2s.
	PollInterval Duration `yaml:"poll_interval"`
	// PlainHTTP also serves the bundle, to anyone, on the plain HTTP
	// listener: for trusted networks, or signed bundles, or clients that
	// cannot present an SVID.
	PlainHTTP bool `yaml:"plain_http"`
}

// Listen holds writd's network listeners.
type Listen struct {
	// HTTP serves /healthz, /readyz, /metrics and /bundle.
	HTTP string `yaml:"http"`
	// GRPC serves the node API to agents over TLS.
	GRPC string `yaml:"grpc"`
	// Decision, if set, serves the authorization decision API (AuthZEN
	// and OPA's data API) over TLS with the control-plane SVID. Off when
	// empty.
	Decision string `yaml:"decision"`
}

// Decision configures the authorization decision API. Its fields matter
// only when listen.decision is set.
type Decision struct {
	// PolicyDir is the policy directory that answers (required).
	PolicyDir string `yaml:"policy_dir"`
	// DecisionPath is the rule AuthZEN evaluations query.
	DecisionPath string `yaml:"decision_path"`
	// AdminPolicyDir holds the admin policy (data.writ.admin.allow) that
	// decides what each caller may ask (required; see policies/admin).
	AdminPolicyDir string `yaml:"admin_policy_dir"`
	// JWTAudiences are the audiences accepted on JWT-SVID bearer tokens;
	// default writd's control-plane SPIFFE ID.
	JWTAudiences []string `yaml:"jwt_audiences"`
	// BaseURL is published as the AuthZEN policy decision point
	// identifier (https://host:port); default from each request's Host.
	BaseURL string `yaml:"base_url"`
	// MaxBodyBytes bounds request bodies.
	MaxBodyBytes int64 `yaml:"max_body_bytes"`
	// MaxEvaluations bounds the items of one AuthZEN batch.
	MaxEvaluations int `yaml:"max_evaluations"`
	// EvalTimeout bounds the evaluation of one request.
	EvalTimeout Duration `yaml:"eval_timeout"`
}

// Admin configures the local admin API.
type Admin struct {
	// Socket is the unix socket path; its file permissions are the
	// authentication.
	Socket string `yaml:"socket"`
	// AllowedUIDs may call the admin API besides writd's own uid and root.
	AllowedUIDs []int `yaml:"allowed_uids"`
}

// CA configures the certificate authority.
type CA struct {
	// KEKFile holds the key-encryption key (32 bytes, base64) that seals the
	// root key at rest; WRIT_CA_KEK may carry it instead.
	KEKFile string `yaml:"kek_file"`
	// RootCertFile and RootKeyFile import an existing root (PEM) on first
	// start instead of generating one.
	RootCertFile string `yaml:"root_cert_file"`
	RootKeyFile  string `yaml:"root_key_file"`

	RootTTL         Duration `yaml:"root_ttl"`
	IntermediateTTL Duration `yaml:"intermediate_ttl"`
	X509SVIDTTL     Duration `yaml:"x509_svid_ttl"`
	X509SVIDMaxTTL  Duration `yaml:"x509_svid_max_ttl"`
	JWTSVIDTTL      Duration `yaml:"jwt_svid_ttl"`
	JWTSVIDMaxTTL   Duration `yaml:"jwt_svid_max_ttl"`
	JWTKeyTTL       Duration `yaml:"jwt_key_ttl"`
	// BundleRefreshHint is published as spiffe_refresh_hint and bounds how
	// long a new root or JWT key waits in the bundle before it signs.
	BundleRefreshHint Duration `yaml:"bundle_refresh_hint"`

	Upstream *Upstream `yaml:"upstream"`
}

// Upstream makes an existing step-ca sign writd's intermediates.
type Upstream struct {
	StepCA *StepCA `yaml:"step_ca"`
}

// StepCA addresses a step-ca and the JWK provisioner writd uses with it.
type StepCA struct {
	URL string `yaml:"url"`
	// RootFile is step-ca's root certificate (PEM), used both to verify
	// its TLS and as the trust bundle's X.509 authority.
	RootFile string `yaml:"root_file"`
	// Provisioner names a JWK provisioner; its private JWK (encrypted, as
	// in step-ca's ca.json) is in ProvisionerKeyFile, and the password that
	// opens it in ProvisionerPasswordFile.
	Provisioner             string `yaml:"provisioner"`
	ProvisionerKeyFile      string `yaml:"provisioner_key_file"`
	ProvisionerPasswordFile string `yaml:"provisioner_password_file"`
}

// Log configures writd's logging.
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // json, text
}

// Defaults.
const (
	DefaultHTTPAddr          = "127.0.0.1:8080"
	DefaultGRPCAddr          = "127.0.0.1:8081"
	DefaultAdminSocket       = "/tmp/writ-admin/admin.sock"
	DefaultRootTTL           = 10 * 365 * 24 * time.Hour
	DefaultIntermediateTTL   = 24 * time.Hour
	DefaultX509SVIDTTL       = time.Hour
	DefaultX509SVIDMaxTTL    = 12 * time.Hour
	DefaultJWTSVIDTTL        = 5 * time.Minute
	DefaultJWTSVIDMaxTTL     = time.Hour
	DefaultJWTKeyTTL         = 24 * time.Hour
	DefaultBundleRefreshHint = 5 * time.Minute
	DefaultPolicyBundleName  = "mesh"
	DefaultPolicyPoll        = 2 * time.Second
	DefaultRegistryGrace     = 30 * time.Second
	DefaultRegistryStale     = 90 * time.Second
	DefaultMeshResync        = time.Minute
	// MinSVIDTTL keeps renew-at-half-life from turning into a busy loop.
	MinSVIDTTL = 30 * time.Second

	// The decision API's defaults (api/decision has the same).
	DefaultDecisionPath    = "data.writ.authzen.decision"
	DefaultDecisionMaxBody = 1 << 20
	DefaultMaxEvaluations  = 256

	DefaultAuditRetentionDays     = 365
	DefaultAuditMinRetentionDays  = 90
	DefaultAuditRetentionInterval = time.Hour
	AuditFsyncGrouped             = "fsync-grouped"
	AuditFsyncPerEvent            = "fsync-per-event"
	DefaultDecisionTimeout        = 2 * time.Second
	MaxDecisionBody               = 64 << 20
	MaxEvaluationsLimit           = 10000
	MaxDecisionEvalTimeout        = time.Minute
)

// LoadServer reads, decodes, defaults and validates a writd config file.
// WRIT_DATABASE_URL, when set, replaces database_url.
func LoadServer(path string) (*Server, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return ParseServer(path, data, os.Getenv)
}

// ParseServer is LoadServer on bytes already read; getenv supplies the
// environment.
func ParseServer(file string, data []byte, getenv func(string) string) (*Server, error) {
	var s Server
	s.applyEnv(getenv)
	if err := Decode(file, data, &serverWithEnv{s: &s, getenv: getenv}); err != nil {
		return nil, err
	}
	return &s, nil
}

// serverWithEnv applies defaults and the environment between decoding and
// validation, so that Validate sees the values writd will run with.
type serverWithEnv struct {
	s      *Server
	getenv func(string) string
}

func (w *serverWithEnv) UnmarshalYAML(unmarshal func(any) error) error {
	return unmarshal(w.s)
}

func (w *serverWithEnv) Validate() []*FieldError {
	w.s.applyEnv(w.getenv)
	w.s.ApplyDefaults()
	return w.s.Validate()
}

func (s *Server) applyEnv(getenv func(string) string) {
	if getenv == nil {
		return
	}
	if v := getenv("WRIT_DATABASE_URL"); v != "" {
		s.DatabaseURL = v
	}
	if v := getenv("WRIT_AUDIT_RETENTION_DATABASE_URL"); v != "" {
		s.Audit.RetentionDatabaseURL = v
	}
}

// ApplyDefaults fills every unset field with its default.
func (s *Server) ApplyDefaults() {
	def := func(d *Duration, v time.Duration) {
		if *d == 0 {
			*d = Duration(v)
		}
	}
	if s.Listen.HTTP == "" {
		s.Listen.HTTP = DefaultHTTPAddr
	}
	if s.Listen.GRPC == "" {
		s.Listen.GRPC = DefaultGRPCAddr
	}
	if s.Admin.Socket == "" {
		s.Admin.Socket = DefaultAdminSocket
	}
	if s.ReplicaID == "" {
		h, _ := os.Hostname()
		s.ReplicaID = fmt.Sprintf("%s-%d", h, os.Getpid())
	}
	def(&s.CA.RootTTL, DefaultRootTTL)
	def(&s.CA.IntermediateTTL, DefaultIntermediateTTL)
	def(&s.CA.X509SVIDTTL, DefaultX509SVIDTTL)
	def(&s.CA.X509SVIDMaxTTL, DefaultX509SVIDMaxTTL)
	def(&s.CA.JWTSVIDTTL, DefaultJWTSVIDTTL)
	def(&s.CA.JWTSVIDMaxTTL, DefaultJWTSVIDMaxTTL)
	def(&s.CA.JWTKeyTTL, DefaultJWTKeyTTL)
	def(&s.CA.BundleRefreshHint, DefaultBundleRefreshHint)
	def(&s.Mesh.RegistryGrace, DefaultRegistryGrace)
	def(&s.Mesh.RegistryStale, DefaultRegistryStale)
	def(&s.Mesh.Resync, DefaultMeshResync)
	if s.Policy != nil {
		if s.Policy.BundleName == "" {
			s.Policy.BundleName = DefaultPolicyBundleName
		}
		def(&s.Policy.PollInterval, DefaultPolicyPoll)
	}
	if s.Listen.Decision != "" {
		d := &s.Decision
		if d.DecisionPath == "" {
			d.DecisionPath = DefaultDecisionPath
		}
		if len(d.JWTAudiences) == 0 && s.TrustDomain != "" {
			d.JWTAudiences = []string{"spiffe://" + s.TrustDomain + "/writ/control-plane"}
		}
		if d.MaxBodyBytes == 0 {
			d.MaxBodyBytes = DefaultDecisionMaxBody
		}
		if d.MaxEvaluations == 0 {
			d.MaxEvaluations = DefaultMaxEvaluations
		}
		def(&d.EvalTimeout, DefaultDecisionTimeout)
	}
	a := &s.Audit
	if a.RetentionDays == 0 {
		a.RetentionDays = DefaultAuditRetentionDays
	}
	if a.MinRetentionDays == 0 {
		a.MinRetentionDays = DefaultAuditMinRetentionDays
	}
	def(&a.RetentionInterval, DefaultAuditRetentionInterval)
	if a.Durability == "" {
		a.Durability = AuditFsyncGrouped
	}
	if s.Log.Level == "" {
		s.Log.Level = "info"
	}
	if s.Log.Format == "" {
		s.Log.Format = "json"
	}
}

// Validate checks values; it expects defaults applied.
func (s *Server) Validate() []*FieldError {
	var errs []*FieldError
	bad := func(field, format string, args ...any) {
		errs = append(errs, &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	if s.TrustDomain == "" {
		bad("trust_domain", "required (for example example.org)")
	} else if err := ValidTrustDomain(s.TrustDomain); err != nil {
		bad("trust_domain", "%v", err)
	}
	if s.DatabaseURL == "" {
		bad("database_url", "required (or set WRIT_DATABASE_URL)")
	} else if u, err := url.Parse(s.DatabaseURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		bad("database_url", "must be a postgres:// URL")
	}
	for field, addr := range map[string]string{"listen.http": s.Listen.HTTP, "listen.grpc": s.Listen.GRPC} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(field, "%q is not host:port", addr)
		}
	}
	if !strings.HasPrefix(s.Admin.Socket, "/") {
		bad("admin.socket", "must be an absolute path")
	}
	for i, uid := range s.Admin.AllowedUIDs {
		if uid < 0 {
			bad(fmt.Sprintf("admin.allowed_uids[%d]", i), "uid must not be negative")
		}
	}
	ca := s.CA
	pos := func(field string, d Duration) bool {
		if d <= 0 {
			bad(field, "must be positive")
			return false
		}
		return true
	}
	pos("mesh.resync", s.Mesh.Resync)
	if pos("mesh.registry_grace", s.Mesh.RegistryGrace) && pos("mesh.registry_stale", s.Mesh.RegistryStale) && s.Mesh.RegistryStale <= s.Mesh.RegistryGrace {
		bad("mesh.registry_stale", "%s must exceed registry_grace (%s): replicas refresh registrations every half grace period", s.Mesh.RegistryStale.D(), s.Mesh.RegistryGrace.D())
	}
	pos("ca.root_ttl", ca.RootTTL)
	pos("ca.intermediate_ttl", ca.IntermediateTTL)
	pos("ca.jwt_key_ttl", ca.JWTKeyTTL)
	pos("ca.bundle_refresh_hint", ca.BundleRefreshHint)
	if pos("ca.x509_svid_ttl", ca.X509SVIDTTL) && ca.X509SVIDTTL.D() < MinSVIDTTL {
		bad("ca.x509_svid_ttl", "must be at least %s", MinSVIDTTL)
	}
	if pos("ca.x509_svid_max_ttl", ca.X509SVIDMaxTTL) && ca.X509SVIDTTL > ca.X509SVIDMaxTTL {
		bad("ca.x509_svid_ttl", "%s exceeds x509_svid_max_ttl %s", ca.X509SVIDTTL.D(), ca.X509SVIDMaxTTL.D())
	}
	if ca.X509SVIDMaxTTL > 0 && ca.IntermediateTTL > 0 && ca.X509SVIDMaxTTL.D() > ca.IntermediateTTL.D()/2 {
		bad("ca.x509_svid_max_ttl", "%s exceeds half the intermediate_ttl (%s): SVIDs would outlive rotation", ca.X509SVIDMaxTTL.D(), ca.IntermediateTTL.D()/2)
	}
	if pos("ca.jwt_svid_ttl", ca.JWTSVIDTTL) && pos("ca.jwt_svid_max_ttl", ca.JWTSVIDMaxTTL) && ca.JWTSVIDTTL > ca.JWTSVIDMaxTTL {
		bad("ca.jwt_svid_ttl", "%s exceeds jwt_svid_max_ttl %s", ca.JWTSVIDTTL.D(), ca.JWTSVIDMaxTTL.D())
	}
	if ca.IntermediateTTL > 0 && ca.RootTTL > 0 && ca.IntermediateTTL >= ca.RootTTL {
		bad("ca.intermediate_ttl", "must be shorter than root_ttl")
	}
	if (ca.RootCertFile == "") != (ca.RootKeyFile == "") {
		bad("ca.root_key_file", "root_cert_file and root_key_file go together")
	}
	if up := ca.Upstream; up != nil {
		if ca.RootCertFile != "" {
			bad("ca.upstream", "an upstream CA and an imported root exclude each other")
		}
		if up.StepCA == nil {
			bad("ca.upstream.step_ca", "required in ca.upstream")
		} else {
			st := up.StepCA
			if u, err := url.Parse(st.URL); err != nil || u.Scheme != "https" || u.Host == "" {
				bad("ca.upstream.step_ca.url", "must be an https:// URL")
			}
			for f, v := range map[string]string{
				"ca.upstream.step_ca.root_file":                 st.RootFile,
				"ca.upstream.step_ca.provisioner":               st.Provisioner,
				"ca.upstream.step_ca.provisioner_key_file":      st.ProvisionerKeyFile,
				"ca.upstream.step_ca.provisioner_password_file": st.ProvisionerPasswordFile,
			} {
				if v == "" {
					bad(f, "required")
				}
			}
		}
	}
	if p := s.Policy; p != nil {
		if p.Dir == "" {
			bad("policy.dir", "required in policy")
		} else if !strings.HasPrefix(p.Dir, "/") {
			bad("policy.dir", "must be an absolute path")
		}
		if !validBundleName(p.BundleName) {
			bad("policy.bundle_name", "%q: want 1 to 64 letters, digits, dots, dashes or underscores", p.BundleName)
		}
		if p.PollInterval.D() < 100*time.Millisecond {
			bad("policy.poll_interval", "must be at least 100ms")
		}
		if !p.PlainHTTP && s.Listen.Decision == "" {
			bad("policy", "the bundle is served over mTLS on listen.decision: set listen.decision, or plain_http: true to serve it unauthenticated")
		}
	}
	if s.Listen.Decision != "" {
		errs = append(errs, s.validateDecision()...)
	}
	a := s.Audit
	if a.MinRetentionDays < 1 {
		bad("audit.min_retention_days", "must be at least 1")
	}
	if a.RetentionDays < a.MinRetentionDays {
		bad("audit.retention_days", "%d is shorter than min_retention_days (%d); events must be kept at least that long", a.RetentionDays, a.MinRetentionDays)
	}
	if a.RetentionInterval.D() < time.Minute {
		bad("audit.retention_interval", "must be at least 1m")
	}
	if a.RetentionDatabaseURL != "" {
		if u, err := url.Parse(a.RetentionDatabaseURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
			bad("audit.retention_database_url", "must be a postgres:// URL")
		}
	}
	if a.Durability != AuditFsyncGrouped && a.Durability != AuditFsyncPerEvent {
		bad("audit.durability", "%q: want %s or %s", a.Durability, AuditFsyncGrouped, AuditFsyncPerEvent)
	}
	switch s.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q: want debug, info, warn or error", s.Log.Level)
	}
	switch s.Log.Format {
	case "json", "text":
	default:
		bad("log.format", "%q: want json or text", s.Log.Format)
	}
	return errs
}

func (s *Server) validateDecision() []*FieldError {
	var errs []*FieldError
	bad := func(field, format string, args ...any) {
		errs = append(errs, &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	if _, _, err := net.SplitHostPort(s.Listen.Decision); err != nil {
		bad("listen.decision", "%q is not host:port", s.Listen.Decision)
	}
	for _, a := range []string{s.Listen.HTTP, s.Listen.GRPC} {
		if a == s.Listen.Decision {
			bad("listen.decision", "%q is already used by another listener", a)
		}
	}
	d := s.Decision
	if d.PolicyDir == "" {
		bad("decision.policy_dir", "required with listen.decision")
	}
	if d.AdminPolicyDir == "" {
		bad("decision.admin_policy_dir", "required with listen.decision (the admin policy decides what callers may ask; see policies/admin)")
	}
	if !strings.HasPrefix(d.DecisionPath, "data.") || strings.ContainsAny(d.DecisionPath, " \t\n") {
		bad("decision.decision_path", "%q: want a rule path such as data.writ.authzen.decision", d.DecisionPath)
	}
	for i, a := range d.JWTAudiences {
		if a == "" || len(a) > 255 {
			bad(fmt.Sprintf("decision.jwt_audiences[%d]", i), "must be 1 to 255 characters")
		}
	}
	if d.BaseURL != "" {
		if u, err := url.Parse(d.BaseURL); err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			bad("decision.base_url", "%q: want https://host[:port] without path, query or fragment", d.BaseURL)
		}
	}
	if d.MaxBodyBytes < 1024 || d.MaxBodyBytes > MaxDecisionBody {
		bad("decision.max_body_bytes", "%d: want 1024 to %d", d.MaxBodyBytes, MaxDecisionBody)
	}
	if d.MaxEvaluations < 1 || d.MaxEvaluations > MaxEvaluationsLimit {
		bad("decision.max_evaluations", "%d: want 1 to %d", d.MaxEvaluations, MaxEvaluationsLimit)
	}
	if d.EvalTimeout <= 0 || d.EvalTimeout.D() > MaxDecisionEvalTimeout {
		bad("decision.eval_timeout", "%s: want more than 0 and at most %s", d.EvalTimeout.D(), MaxDecisionEvalTimeout)
	}
	return errs
}

// ValidTrustDomain checks a SPIFFE trust domain name: lowercase letters,
// digits, dots, dashes and underscores.
func ValidTrustDomain(td string) error {
	if td == "" {
		return fmt.Errorf("trust domain is empty")
	}
	if len(td) > 255 {
		return fmt.Errorf("trust domain is longer than 255 characters")
	}
	for _, r := range td {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
		default:
			return fmt.Errorf("trust domain %q: only lowercase letters, digits, '.', '-' and '_' are allowed", td)
		}
	}
	return nil
}

// validBundleName reports whether a bundle name is safe in a URL path.
func validBundleName(n string) bool {
	if n == "" || len(n) > 64 || n == "." || n == ".." {
		return false
	}
	for _, r := range n {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
		default:
			return false
		}
	}
	return true
}
