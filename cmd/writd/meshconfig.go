package main

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/writmesh/writ/api/admin"
	"github.com/writmesh/writ/config"
	"github.com/writmesh/writ/xds"
)

// maxApplyFiles bounds the files of one apply.
const maxApplyFiles = 200

// meshAdmin serves the mesh configuration routes of the admin API. Every
// call is recorded as an admin event by the admin server; the handlers add
// what changed, and the revisions table keeps the diffs.
type meshAdmin struct {
	store *xds.Store
	srv   *xds.Server
}

func (m *meshAdmin) register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/mesh/apply", m.apply)
	mux.HandleFunc("GET /v1/mesh/resources", m.list)
	mux.HandleFunc("GET /v1/mesh/resources/{kind}/{namespace}/{name}", m.get)
	mux.HandleFunc("DELETE /v1/mesh/resources/{kind}/{namespace}/{name}", m.delete)
	mux.HandleFunc("GET /v1/mesh/history/{kind}/{namespace}/{name}", m.history)
	mux.HandleFunc("POST /v1/mesh/rollback/{kind}/{namespace}/{name}", m.rollback)
	mux.HandleFunc("GET /v1/mesh/nodes", m.nodes)
	mux.HandleFunc("GET /v1/mesh/endpoints", m.endpoints)
}

func (m *meshAdmin) fail(w http.ResponseWriter, err error) {
	var es config.Errors
	var fe *config.FieldError
	switch {
	case errors.As(err, &es), errors.As(err, &fe):
		admin.WriteError(w, http.StatusBadRequest, err.Error())
	case errors.Is(err, xds.ErrNotFound):
		admin.WriteError(w, http.StatusNotFound, "not found")
	default:
		admin.WriteError(w, http.StatusInternalServerError, "internal error; see writd's log")
	}
}

func (m *meshAdmin) apply(w http.ResponseWriter, r *http.Request) {
	var req xds.ApplyRequest
	if !admin.Decode(w, r, &req) {
		return
	}
	if len(req.Files) == 0 || len(req.Files) > maxApplyFiles {
		admin.WriteError(w, http.StatusBadRequest, fmt.Sprintf("send between 1 and %d files", maxApplyFiles))
		return
	}
	// Every file is parsed before anything is stored; all errors of all
	// files are reported together.
	var rs []*config.Resource
	var errs config.Errors
	for _, f := range req.Files {
		got, err := config.DecodeMesh(f.Name, []byte(f.Content))
		var es config.Errors
		if errors.As(err, &es) {
			errs = append(errs, es...)
			continue
		} else if err != nil {
			errs = append(errs, &config.FieldError{File: f.Name, Msg: err.Error()})
			continue
		}
		rs = append(rs, got...)
	}
	if len(errs) > 0 {
		admin.Note(r, "refused", len(errs))
		admin.WriteError(w, http.StatusBadRequest, errs.Error())
		return
	}
	changes, err := m.store.Apply(r.Context(), admin.Actor(r), rs, req.DryRun)
	if err != nil {
		admin.Note(r, "refused", err.Error())
		m.fail(w, err)
		return
	}
	var noted []string
	for _, c := range changes {
		if c.Op != "unchanged" {
			noted = append(noted, fmt.Sprintf("%s %s/%s/%s rev %d", c.Op, c.Kind, c.Namespace, c.Name, c.Revision))
		}
	}
	admin.Note(r, "dry_run", req.DryRun)
	admin.Note(r, "changes", noted)
	gen, _, _ := m.store.Load(r.Context())
	admin.WriteJSON(w, http.StatusOK, xds.ApplyResponse{Generation: gen, Changes: changes})
}

func kindArg(w http.ResponseWriter, s string) (string, bool) {
	k, ok := config.KindOf(s)
	if !ok {
		admin.WriteError(w, http.StatusBadRequest, fmt.Sprintf("unknown kind %q", s))
	}
	return k, ok
}

func (m *meshAdmin) list(w http.ResponseWriter, r *http.Request) {
	kind := ""
	if k := r.URL.Query().Get("kind"); k != "" {
		var ok bool
		if kind, ok = kindArg(w, k); !ok {
			return
		}
	}
	rs, err := m.store.List(r.Context(), kind)
	if err != nil {
		m.fail(w, err)
		return
	}
	if ns := r.URL.Query().Get("namespace"); ns != "" {
		var keep []*config.Resource
		for _, res := range rs {
			if res.Metadata.Namespace == ns {
				keep = append(keep, res)
			}
		}
		rs = keep
	}
	if rs == nil {
		rs = []*config.Resource{}
	}
	admin.WriteJSON(w, http.StatusOK, xds.ResourceList{Resources: rs})
}

func (m *meshAdmin) get(w http.ResponseWriter, r *http.Request) {
	kind, ok := kindArg(w, r.PathValue("kind"))
	if !ok {
		return
	}
	res, _, err := m.store.Get(r.Context(), kind, r.PathValue("namespace"), r.PathValue("name"))
	if err != nil {
		m.fail(w, err)
		return
	}
	admin.WriteJSON(w, http.StatusOK, res)
}

func (m *meshAdmin) delete(w http.ResponseWriter, r *http.Request) {
	kind, ok := kindArg(w, r.PathValue("kind"))
	if !ok {
		return
	}
	c, err := m.store.Delete(r.Context(), admin.Actor(r), kind, r.PathValue("namespace"), r.PathValue("name"))
	if err != nil {
		m.fail(w, err)
		return
	}
	admin.Note(r, "changes", []string{fmt.Sprintf("deleted %s/%s/%s rev %d", c.Kind, c.Namespace, c.Name, c.Revision)})
	admin.WriteJSON(w, http.StatusOK, c)
}

func (m *meshAdmin) history(w http.ResponseWriter, r *http.Request) {
	kind, ok := kindArg(w, r.PathValue("kind"))
	if !ok {
		return
	}
	h, err := m.store.History(r.Context(), kind, r.PathValue("namespace"), r.PathValue("name"))
	if err != nil {
		m.fail(w, err)
		return
	}
	admin.WriteJSON(w, http.StatusOK, xds.HistoryResponse{Revisions: h})
}

func (m *meshAdmin) rollback(w http.ResponseWriter, r *http.Request) {
	kind, ok := kindArg(w, r.PathValue("kind"))
	if !ok {
		return
	}
	var req xds.RollbackRequest
	if !admin.Decode(w, r, &req) {
		return
	}
	c, err := m.store.Rollback(r.Context(), admin.Actor(r), kind, r.PathValue("namespace"), r.PathValue("name"), req.Revision)
	if err != nil {
		m.fail(w, err)
		return
	}
	admin.Note(r, "changes", []string{fmt.Sprintf("rolled back %s/%s/%s to rev %s as rev %d", c.Kind, c.Namespace, c.Name, strconv.FormatInt(req.Revision, 10), c.Revision)})
	admin.WriteJSON(w, http.StatusOK, c)
}

func (m *meshAdmin) nodes(w http.ResponseWriter, r *http.Request) {
	admin.WriteJSON(w, http.StatusOK, xds.NodeList{Nodes: m.srv.Nodes()})
}

func (m *meshAdmin) endpoints(w http.ResponseWriter, r *http.Request) {
	eps, err := m.store.Endpoints(r.Context())
	if err != nil {
		m.fail(w, err)
		return
	}
	if eps == nil {
		eps = []xds.Endpoint{}
	}
	admin.WriteJSON(w, http.StatusOK, eps)
}
