package admin

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/writmesh/writ/authority"
	"github.com/writmesh/writ/internal/peercred"
)

// Wire types, shared with the CLI's client.

// Duration is a time.Duration in JSON as Go duration text.
type Duration string

// WhoAmI answers GET /v1/whoami.
type WhoAmI struct {
	UID uint32 `json:"uid"`
	PID int32  `json:"pid"`
}

// CreateTokenRequest is POST /v1/join-tokens.
type CreateTokenRequest struct {
	SPIFFEID string   `json:"spiffe_id"`
	TTL      Duration `json:"ttl"`
}

// Token is a created join token; the token is shown only here, once.
type Token struct {
	Token     string    `json:"token"`
	SPIFFEID  string    `json:"spiffe_id"`
	ExpiresAt time.Time `json:"expires_at"`
}

// EntryRequest is POST /v1/entries.
type EntryRequest struct {
	SPIFFEID  string   `json:"spiffe_id"`
	ParentID  string   `json:"parent_id"`
	Selectors []string `json:"selectors"`
	X509TTL   Duration `json:"x509_ttl,omitempty"`
	JWTTTL    Duration `json:"jwt_ttl,omitempty"`
}

// Entry is a registration entry.
type Entry struct {
	ID        string    `json:"id"`
	SPIFFEID  string    `json:"spiffe_id"`
	ParentID  string    `json:"parent_id"`
	Selectors []string  `json:"selectors"`
	X509TTL   Duration  `json:"x509_ttl,omitempty"`
	JWTTTL    Duration  `json:"jwt_ttl,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by"`
}

// EntryList is GET /v1/entries.
type EntryList struct {
	Entries []Entry `json:"entries"`
}

// Issuance is one issuance log row.
type Issuance struct {
	At       time.Time  `json:"at"`
	Kind     string     `json:"kind"`
	Outcome  string     `json:"outcome"`
	Serial   string     `json:"serial,omitempty"`
	SPIFFEID string     `json:"spiffe_id,omitempty"`
	NotAfter *time.Time `json:"not_after,omitempty"`
	NodeID   string     `json:"node_id,omitempty"`
	EntryID  string     `json:"entry_id,omitempty"`
	Caller   string     `json:"caller,omitempty"`
	Signer   string     `json:"signer,omitempty"`
	Reason   string     `json:"reason,omitempty"`
}

// RootRotation is GET and POST /v1/ca/root-rotation.
type RootRotation struct {
	Phase        string     `json:"phase"`
	ActiveRootID string     `json:"active_root_id"`
	OldRootID    string     `json:"old_root_id,omitempty"`
	NewRootID    string     `json:"new_root_id,omitempty"`
	StartedAt    *time.Time `json:"started_at,omitempty"`
	NextStepAt   *time.Time `json:"next_step_at,omitempty"`
	CompletedAt  *time.Time `json:"completed_at,omitempty"`
}

func rotationOut(r authority.RootRotation) RootRotation {
	opt := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		return &t
	}
	return RootRotation{Phase: string(r.Phase), ActiveRootID: r.ActiveRootID, OldRootID: r.OldRootID, NewRootID: r.NewRootID,
		StartedAt: opt(r.StartedAt), NextStepAt: opt(r.NextStepAt), CompletedAt: opt(r.CompletedAt)}
}

// IssuanceList is GET /v1/issuances.
type IssuanceList struct {
	Issuances []Issuance `json:"issuances"`
}

func parseDuration(d Duration) (time.Duration, error) {
	if d == "" {
		return 0, nil
	}
	v, err := time.ParseDuration(string(d))
	if err != nil {
		return 0, &authority.InputError{Msg: "invalid duration " + strconv.Quote(string(d)) + " (use forms such as 90s, 10m, 1h)"}
	}
	return v, nil
}

func durationOf(d time.Duration) Duration {
	if d == 0 {
		return ""
	}
	return Duration(d.String())
}

func entryOut(e *authority.Entry) Entry {
	out := Entry{ID: e.ID, SPIFFEID: e.SPIFFEID.String(), ParentID: e.ParentID.String(),
		X509TTL: durationOf(e.X509TTL), JWTTTL: durationOf(e.JWTTTL), CreatedAt: e.CreatedAt, CreatedBy: e.CreatedBy}
	for _, s := range e.Selectors {
		out.Selectors = append(out.Selectors, s.String())
	}
	return out
}

func (s *Server) whoami(w http.ResponseWriter, r *http.Request) {
	cred, _ := r.Context().Value(credKey{}).(peercred.Cred)
	writeJSON(w, http.StatusOK, WhoAmI{UID: cred.UID, PID: cred.PID})
}

func (s *Server) createToken(w http.ResponseWriter, r *http.Request) {
	var req CreateTokenRequest
	if !decode(w, r, &req) {
		return
	}
	note(r, "spiffe_id", req.SPIFFEID)
	ttl, err := parseDuration(req.TTL)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if ttl == 0 {
		ttl = 10 * time.Minute
	}
	tok, err := s.o.Registry.CreateJoinToken(r.Context(), req.SPIFFEID, ttl, actorOf(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	note(r, "expires_at", tok.ExpiresAt)
	writeJSON(w, http.StatusCreated, Token{Token: tok.Token, SPIFFEID: tok.SPIFFEID.String(), ExpiresAt: tok.ExpiresAt})
}

func (s *Server) createEntry(w http.ResponseWriter, r *http.Request) {
	var req EntryRequest
	if !decode(w, r, &req) {
		return
	}
	note(r, "spiffe_id", req.SPIFFEID)
	note(r, "parent_id", req.ParentID)
	note(r, "selectors", req.Selectors)
	x509TTL, err := parseDuration(req.X509TTL)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	jwtTTL, err := parseDuration(req.JWTTTL)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	e, err := s.o.Registry.CreateEntry(r.Context(), authority.EntryInput{
		SPIFFEID: req.SPIFFEID, ParentID: req.ParentID, Selectors: req.Selectors, X509TTL: x509TTL, JWTTTL: jwtTTL,
	}, actorOf(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	note(r, "entry_id", e.ID)
	writeJSON(w, http.StatusCreated, entryOut(e))
}

func (s *Server) listEntries(w http.ResponseWriter, r *http.Request) {
	list, err := s.o.Registry.ListEntries(r.Context(), nil)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := EntryList{Entries: []Entry{}}
	for _, e := range list {
		out.Entries = append(out.Entries, entryOut(e))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) getEntry(w http.ResponseWriter, r *http.Request) {
	e, err := s.o.Registry.GetEntry(r.Context(), r.PathValue("id"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, entryOut(e))
}

func (s *Server) deleteEntry(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	note(r, "entry_id", id)
	if err := s.o.Registry.DeleteEntry(r.Context(), id); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) bundle(w http.ResponseWriter, r *http.Request) {
	b, err := s.o.Bundle(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	doc, err := b.Marshal()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(doc)
}

func (s *Server) issuances(w http.ResponseWriter, r *http.Request) {
	limit := 100
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > 10000 {
			writeError(w, http.StatusBadRequest, "limit must be between 1 and 10000")
			return
		}
		limit = n
	}
	list, err := s.o.Registry.ListIssuances(r.Context(), limit)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := IssuanceList{Issuances: []Issuance{}}
	for _, is := range list {
		o := Issuance{At: is.At, Kind: is.Kind, Outcome: is.Outcome, Serial: is.Serial, SPIFFEID: is.SPIFFEID, NodeID: is.NodeID,
			EntryID: is.EntryID, Caller: is.Caller, Signer: is.Signer, Reason: is.Reason}
		if !is.NotAfter.IsZero() {
			t := is.NotAfter
			o.NotAfter = &t
		}
		out.Issuances = append(out.Issuances, o)
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) rotationStatus(w http.ResponseWriter, r *http.Request) {
	if s.o.CA == nil {
		writeError(w, http.StatusConflict, "the root is managed upstream (step-ca): rotate it there")
		return
	}
	st, err := s.o.CA.RootRotationStatus(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rotationOut(st))
}

func (s *Server) rotateRoot(w http.ResponseWriter, r *http.Request) {
	if s.o.CA == nil {
		writeError(w, http.StatusConflict, "the root is managed upstream (step-ca): rotate it there")
		return
	}
	st, err := s.o.CA.RotateRoot(r.Context())
	if errors.Is(err, authority.ErrRotationInProgress) {
		writeError(w, http.StatusConflict, err.Error())
		return
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	note(r, "new_root_id", st.NewRootID)
	writeJSON(w, http.StatusAccepted, rotationOut(st))
}
