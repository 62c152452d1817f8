package proxy

import (
	"context"
	"io"
	"mime"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// forwarder is the reverse proxy of both listeners. The common request —
// HTTP/1.1 with a body of known length that the HTTP/1.1 transport sends
// in one write, no upgrade, a query ReverseProxy would not rewrite — is
// forwarded here with ReverseProxy's header rules (the Rewrite flavour:
// hop-by-hop and client-sent forwarding headers dropped, Te: trailers
// kept, no default User-Agent added) but without its per-request request
// clone, header clone, client trace and flush machinery. Everything else
// goes to rp. It is safe for concurrent use.
type forwarder struct {
	rp        *httputil.ReverseProxy
	transport http.RoundTripper
	// scheme and host are what Rewrite sets on the outbound URL (host ""
	// keeps the request's).
	scheme, host string
}

// newForwarder forwards to scheme://host (host "" keeps the request's
// URL host) through transport, on both paths alike: the fast path and
// rp's Rewrite are made from the same three values.
func newForwarder(transport http.RoundTripper, scheme, host string) *forwarder {
	return &forwarder{rp: &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = scheme
			if host != "" {
				pr.Out.URL.Host = host
			}
		},
		Transport:    transport,
		BufferPool:   bufPool,
		ErrorHandler: proxyError,
	}, transport: transport, scheme: scheme, host: host}
}

// fwdReq is the outbound request and its URL in one allocation.
type fwdReq struct {
	req http.Request
	url url.URL
}

// serve forwards r under ctx. fastOK says whether the transport r would
// take is the synchronous HTTP/1.1 one (which never reports 1xx
// responses, so there is no client trace to install).
func (f *forwarder) serve(ctx context.Context, w http.ResponseWriter, r *http.Request, fastOK bool) {
	own := ctx == r.Context()
	if !fastOK || r.ProtoMajor != 1 || r.ProtoMinor < 1 || !fast(r) || !cleanQuery(r.URL.RawQuery) {
		if !own {
			r = r.WithContext(ctx)
		}
		f.rp.ServeHTTP(w, r)
		return
	}
	// To a cluster, the outbound request is made as a tryReq, which the
	// roundTripper takes for its first try instead of copying it again.
	rt, toCluster := f.transport.(roundTripper)
	var fr *fwdReq
	var first *tryReq
	switch {
	case toCluster && !own:
		// The copy WithContext makes is only copied from, so it stays
		// on the stack: one allocation for the outbound request.
		first = &tryReq{fwdReq: fwdReq{req: *r.WithContext(ctx), url: *r.URL}}
		fr = &first.fwdReq
	case toCluster:
		first = &tryReq{fwdReq: fwdReq{req: *r, url: *r.URL}}
		fr = &first.fwdReq
	case !own:
		fr = &fwdReq{req: *r.WithContext(ctx), url: *r.URL}
	default:
		fr = &fwdReq{req: *r, url: *r.URL}
	}
	out := &fr.req
	out.URL = &fr.url
	out.URL.Scheme = f.scheme
	if f.host != "" {
		out.URL.Host = f.host
	}
	out.Close = false
	if r.ContentLength == 0 {
		out.Body = nil
	} else if _, own := r.Body.(*h1ReqBody); !own {
		// The transport closes what it sends; the server's body is the
		// server's to close.
		out.Body = io.NopCloser(r.Body)
	}
	// The inbound request's header is the outbound one: nothing reads it
	// after the handler forwards (the route, policy and mirror copy are
	// done by then), so the rules apply in place instead of to a clone.
	h := r.Header
	if h == nil {
		h = http.Header{}
	}
	out.Header = h
	te := httpguts.HeaderValuesContainsToken(h["Te"], "trailers")
	removeHopByHop(h)
	if te {
		h["Te"] = teTrailers
	}
	delete(h, "Forwarded")
	delete(h, "X-Forwarded-For")
	delete(h, "X-Forwarded-Host")
	delete(h, "X-Forwarded-Proto")
	if _, ok := h["User-Agent"]; !ok {
		h["User-Agent"] = emptyValue
	}

	var res *http.Response
	var err error
	if first != nil {
		res, err = rt.roundTrip(out, first)
	} else {
		res, err = f.transport.RoundTrip(out)
	}
	if err != nil {
		proxyError(w, out, err)
		return
	}
	removeHopByHop(res.Header)
	dst := w.Header()
	for k, vv := range res.Header {
		// The response's slices are its own and not used after: shared,
		// not copied (append copies when capacity runs out).
		if old, ok := dst[k]; ok {
			dst[k] = append(old, vv...)
		} else {
			dst[k] = vv
		}
	}
	announced := len(res.Trailer)
	if announced > 0 {
		keys := make([]string, 0, announced)
		for k := range res.Trailer {
			keys = append(keys, k)
		}
		dst.Add("Trailer", strings.Join(keys, ", "))
	}
	w.WriteHeader(res.StatusCode)
	if err := copyBody(w, res, streaming(res)); err != nil {
		res.Body.Close()
		// Mid-body: all a proxy can do is end the response abruptly.
		panic(http.ErrAbortHandler)
	}
	res.Body.Close() // populates res.Trailer
	if len(res.Trailer) > 0 {
		if fl, ok := w.(http.Flusher); ok {
			fl.Flush() // trailers need chunking, even for a short body
		}
	}
	if len(res.Trailer) == announced {
		for k, vv := range res.Trailer {
			dst[k] = append(dst[k], vv...)
		}
		return
	}
	for k, vv := range res.Trailer {
		k = http.TrailerPrefix + k
		dst[k] = append(dst[k], vv...)
	}
}

var (
	teTrailers = []string{"trailers"}
	emptyValue = []string{""}
)

// streaming says whether each piece of the body is flushed at once, as
// ReverseProxy does for server-sent events and bodies of unknown length.
func streaming(res *http.Response) bool {
	if res.ContentLength == -1 {
		return true
	}
	ct := res.Header.Get("Content-Type")
	const sse = "text/event-stream"
	if len(ct) < len(sse) || !strings.EqualFold(ct[:len(sse)], sse) {
		return false
	}
	base, _, _ := mime.ParseMediaType(ct)
	return base == sse
}

// copyBody copies the response body to w with a pooled buffer.
func copyBody(w http.ResponseWriter, res *http.Response, flush bool) error {
	buf := bufPool.Get()
	defer bufPool.Put(buf)
	fl, _ := w.(http.Flusher)
	if !flush {
		fl = nil
	}
	if fl != nil {
		fl.Flush() // the head goes out even if the body is slow to come
	}
	for {
		n, rerr := res.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			if fl != nil {
				fl.Flush()
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// hopHeaders are the hop-by-hop fields ReverseProxy removes.
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// removeHopByHop drops the fields Connection names and the hop-by-hop
// ones, as ReverseProxy does.
func removeHopByHop(h http.Header) {
	for _, f := range h["Connection"] {
		for sf := range strings.SplitSeq(f, ",") {
			if sf = textproto.TrimString(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
	for _, f := range hopHeaders {
		delete(h, f)
	}
}

// cleanQuery says whether ReverseProxy would leave the query as it is
// (it re-encodes one with a semicolon or a malformed escape).
func cleanQuery(s string) bool {
	for i := 0; i < len(s); {
		switch s[i] {
		case ';':
			return false
		case '%':
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				return false
			}
			i += 3
		default:
			i++
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}
