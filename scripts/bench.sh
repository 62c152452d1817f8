#!/usr/bin/env bash
# Whole-system benchmark (make bench): fortio against the app directly, a
# writ-proxy pair (mTLS, Rego authz, decision records), an nginx mTLS pair
# without and with auth_request to a stock OPA server, and an HAProxy mTLS
# pair; see test/bench_system_test.go and docs/proxy.md. Installs what is
# missing: nginx-light and haproxy (apt-get), fortio v1.66.0 and the stock
# OPA of go.mod (go install, cached under .tmp/). Knobs: WRIT_BENCH_DUR
# (default 10s per run), WRIT_BENCH_QPS (1000), WRIT_BENCH_CONC (16),
# WRIT_BENCH_ONLY (e.g. writ,nginx), WRIT_BENCH_PROXY_ENV, WRIT_BENCH_NOBUILD,
# WRIT_BENCH_PPROF (a directory for the writ pair's profiles and strace counts),
# WRIT_BENCH_TRACE (a directory for the writ pair's execution traces).
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian starts the packaged daemons; the benchmark runs its own.
for svc in nginx haproxy; do
  if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then
    echo "bench: note: a system $svc is running (it shares the CPU)" >&2
  fi
done

# fortio: v1.66.0 is the last version whose modules the proxy serves here.
fortio_dir=$PWD/.tmp/fortio/v1.66.0
if [ ! -x "$fortio_dir/fortio" ]; then
  mkdir -p "$fortio_dir"
  GOBIN=$fortio_dir "$GO" install fortio.org/fortio@v1.66.0
fi
opa_version=$(awk '$1 == "github.com/open-policy-agent/opa" {print $2}' go.mod)
opa_dir=$PWD/.tmp/opa/$opa_version
if [ ! -x "$opa_dir/opa" ]; then
  echo "bench: building stock OPA $opa_version into $opa_dir (a few minutes the first time)" >&2
  mkdir -p "$opa_dir"
  GOBIN=$opa_dir "$GO" install "github.com/open-policy-agent/opa@$opa_version"
fi

bin=${WRIT_BIN_DIR:-$PWD/bin}
mkdir -p "$bin"
# WRIT_BENCH_NOBUILD=1 runs prebuilt binaries of $WRIT_BIN_DIR (A/B runs).
if [ -z "${WRIT_BENCH_NOBUILD:-}" ]; then
  CGO_ENABLED=0 "$GO" build -o "$bin/" ./cmd/... # as make build
fi

pg_dir=$PWD/.tmp/benchpg
if [ -z "${WRIT_TEST_DATABASE_URL:-}" ]; then
  WRIT_TEST_DATABASE_URL=$(scripts/pg.sh start "$pg_dir")
  trap 'scripts/pg.sh stop "$pg_dir" >/dev/null 2>&1 || true' EXIT
  export WRIT_TEST_DATABASE_URL
fi

WRIT_FORTIO_BIN=$fortio_dir/fortio WRIT_OPA_BIN=$opa_dir/opa WRIT_BIN_DIR=$bin \
  "$GO" test ./test -run '^$' -bench '^BenchmarkSystem$' -benchtime 1x -count 1 -timeout 20m
