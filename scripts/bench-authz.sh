#!/usr/bin/env bash
# Side-by-side authorization benchmark (make bench-authz): Writ's in-process
# check, writ-enforcer over gRPC and a stock OPA server over its data API,
# answering the same requests with the same 50-rule opa-envoy-style policy,
# both servers pulling it from writd's bundle service. Loopback only,
# bounded in count and time. Knobs: WRIT_BENCH_CONC, WRIT_BENCH_N,
# WRIT_BENCH_MAX (see test/bench_authz_test.go).
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
opa_version=$(awk '$1 == "github.com/open-policy-agent/opa" {print $2}' go.mod)
if [ -z "$opa_version" ]; then
  echo "bench-authz: no github.com/open-policy-agent/opa in go.mod" >&2
  exit 1
fi
opa_dir=$PWD/.tmp/opa/$opa_version
if [ ! -x "$opa_dir/opa" ]; then
  echo "bench-authz: building stock OPA $opa_version into $opa_dir (a few minutes the first time)" >&2
  mkdir -p "$opa_dir"
  GOBIN=$opa_dir "$GO" install "github.com/open-policy-agent/opa@$opa_version"
fi

bin=${WRIT_BIN_DIR:-$PWD/bin}
if [ ! -x "$bin/writ-enforcer" ] || [ ! -x "$bin/writd" ]; then
  mkdir -p "$bin"
  "$GO" build -o "$bin/" ./cmd/...
fi

pg_dir=$PWD/.tmp/benchpg
if [ -z "${WRIT_TEST_DATABASE_URL:-}" ]; then
  WRIT_TEST_DATABASE_URL=$(scripts/pg.sh start "$pg_dir")
  trap 'scripts/pg.sh stop "$pg_dir" >/dev/null 2>&1 || true' EXIT
  export WRIT_TEST_DATABASE_URL
fi

echo "stock OPA $opa_version: $("$opa_dir/opa" version | head -1)"
WRIT_OPA_BIN=$opa_dir/opa WRIT_BIN_DIR=$bin \
  "$GO" test ./test -run '^$' -bench '^BenchmarkAuthzSideBySide$' -benchtime 1x -count 1 -timeout 15m
