# Writ's build. `make test` is the test command README.md gives and CI runs.
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
PKGS := ./...
# Test PostgreSQL: a throwaway cluster under this dir unless
# WRIT_TEST_DATABASE_URL already points at a server.
TEST_PG_DIR ?= $(CURDIR)/.tmp/testpg
GOTEST_FLAGS ?= -count=1 -timeout 20m

.PHONY: all build test test-short lint vet fmt demo bench bench-proxy bench-authz bench-xds proto clean

all: build

build:
	@mkdir -p $(BIN)
	# Static, pure-Go binaries: no libc or ld.so mapped into every
	# sidecar (~1.5 MiB resident per writ-proxy) and nothing to match on
	# the node; net and os/user use their Go implementations.
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/...

# Unit and integration tests, on real PostgreSQL.
test: build
	@set -e; \
	if [ -z "$$WRIT_TEST_DATABASE_URL" ]; then \
	  url=$$(scripts/pg.sh start $(TEST_PG_DIR)); \
	  trap 'scripts/pg.sh stop $(TEST_PG_DIR)' EXIT; \
	  export WRIT_TEST_DATABASE_URL=$$url; \
	fi; \
	WRIT_BIN_DIR=$(BIN) $(GO) test $(GOTEST_FLAGS) $(PKGS)

lint: vet fmt

vet:
	$(GO) vet $(PKGS)

fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# A working mesh on a throwaway PostgreSQL; Ctrl-C stops it all.
demo: build
	scripts/demo.sh

# The whole-system benchmark: fortio against the app directly, a
# writ-proxy pair (mTLS, authz, audit), nginx pairs (mTLS, with and without
# auth_request to a stock OPA) and an HAProxy pair, at 1,000 rps and at
# saturation (docs/proxy.md). Installs nginx-light/haproxy/fortio/OPA when
# missing. WRIT_BENCH_DUR (10s), WRIT_BENCH_ONLY=writ,nginx to narrow it.
bench: build
	WRIT_BIN_DIR=$(BIN) scripts/bench.sh

# In-process benchmarks: figures for the CA, and the proxy pair beside a
# direct connection (compare ns/op and allocs/op line by line).
bench-proxy:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2s ./authority/...
	$(GO) test -run '^$$' -bench 'Direct|ProxyPair' -benchmem -benchtime 5000x ./proxy/

# Writ's in-process check and writ-enforcer side by side with a stock OPA
# server (built from the OPA version in go.mod, cached under .tmp/opa).
bench-authz: build
	WRIT_BIN_DIR=$(BIN) scripts/bench-authz.sh
# N simulated ADS clients over mTLS; per route change, the time until every
# client has ACKed the new version (p50, p99, max). First against the xds
# server in-process (heap of server and clients), then against the real
# writd binary with changes made by `writ apply` (writd's RSS).
XDS_CLIENTS ?= 1000
bench-xds: build
	WRIT_BENCH_XDS_N=$(XDS_CLIENTS) $(GO) test -run '^$$' -bench BenchmarkADSPush -benchtime 5x ./xds
	WRIT_BENCH_XDS_N=$(XDS_CLIENTS) WRIT_BIN_DIR=$(BIN) $(GO) test -run '^$$' -bench BenchmarkWritdADSPush -benchtime 5x ./test

proto:
	cd authority/nodeapi && PATH="$$PATH:$$($(GO) env GOPATH)/bin" $(GO) generate .

clean:
	rm -rf $(BIN) .tmp

# The audit pipeline's figures (docs/audit.md): spool append latency per
# durability mode, the audited Check path, and ingest from spool to
# committed rows on a throwaway PostgreSQL.
.PHONY: bench-audit
bench-audit:
	$(GO) test -run '^$$' -bench SpoolAppend -benchtime 2000x ./audit/
	$(GO) test -run '^$$' -bench Shipper -benchmem -benchtime 50000x ./audit/
	$(GO) test -run '^$$' -bench AuditSinkRecord -benchmem ./enforcer/
	$(GO) test -run '^$$' -bench CheckAudited -benchtime 1000x ./test/
	$(GO) test -run '^$$' -bench 'Ingest|Insert$$|InsertAB/7-indexes' -benchtime 100000x ./audit/collector/

# Compliance report generation over WRIT_BENCH_REPORT_N decisions (default
# 100,000) per export format, with the time spent per section
# (docs/compliance.md).
.PHONY: bench-report
bench-report:
	$(GO) test -run '^$$' -bench Report -benchtime 3x ./compliance/
