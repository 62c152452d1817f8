package decision_test

import (
	"bytes"
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

const benchEval = `{"subject": {"type": "user", "id": "bob@example.com"}, "resource": {"type": "document", "id": "1"}, "action": {"name": "can_read"}}`

// BenchmarkEvaluationHandler is one AuthZEN evaluation through the
// handler in-process: X.509 SVID verification, the admin policy, strict
// decoding, the decision policy and the audit record, without the network.
func BenchmarkEvaluationHandler(b *testing.B) {
	e := newEnv(b, envOptions{})
	svid := issue(b, e.auth, appID)
	state := &tls.ConnectionState{PeerCertificates: svid.Certificates, HandshakeComplete: true}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		req := httptest.NewRequest("POST", "/access/v1/evaluation", bytes.NewReader([]byte(benchEval)))
		req.TLS = state
		rec := httptest.NewRecorder()
		e.api.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
	}
}

// BenchmarkEvaluationHandlerJWT is the same with a JWT-SVID bearer token
// instead of a client certificate.
func BenchmarkEvaluationHandlerJWT(b *testing.B) {
	e := newEnv(b, envOptions{})
	tok := e.token(appID, testAudience)
	state := &tls.ConnectionState{HandshakeComplete: true}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		req := httptest.NewRequest("POST", "/access/v1/evaluation", bytes.NewReader([]byte(benchEval)))
		req.TLS = state
		req.Header.Set("Authorization", "Bearer "+tok)
		rec := httptest.NewRecorder()
		e.api.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
	}
}

// BenchmarkEvaluationTLS is one AuthZEN evaluation over a kept-alive mTLS
// connection on loopback.
func BenchmarkEvaluationTLS(b *testing.B) {
	e := newEnv(b, envOptions{})
	c := e.mtls(appID)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		resp, err := c.Post(e.url+"/access/v1/evaluation", "application/json", bytes.NewReader([]byte(benchEval)))
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
}
