#!/usr/bin/env bash
# make demo: a working Writ identity plane on a throwaway PostgreSQL.
#
# Starts PostgreSQL, writd and a node agent (writ-proxy), registers two
# workloads, and runs go-spiffe's own spiffe-tls example server and client,
# which fetch their X.509 SVIDs from the agent's Workload API and talk over
# mutual TLS. Then it waits until Ctrl-C and stops everything.
#
#   WRIT_DEMO_EXIT=1   stop after the walkthrough instead of waiting
#   WRIT_DEMO_DIR      working dir (default .tmp/demo)
#   WRIT_DEMO_HTTP / WRIT_DEMO_GRPC / WRIT_DEMO_AGENT_ADMIN   listen addresses
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${WRIT_BIN_DIR:-$root/bin}
demo=${WRIT_DEMO_DIR:-$root/.tmp/demo}
http_addr=${WRIT_DEMO_HTTP:-127.0.0.1:18080}
grpc_addr=${WRIT_DEMO_GRPC:-127.0.0.1:18081}
agent_admin=${WRIT_DEMO_AGENT_ADMIN:-127.0.0.1:15000}
# go-spiffe's examples look for the Workload API here.
agent_sock=/tmp/agent.sock

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pids=()
cleanup() {
  say "stopping"
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  scripts/pg.sh stop "$demo/pg" || true
  echo "stopped; logs are in $demo"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # url, what
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "demo: $2 did not become ready; see $demo/*.log" >&2
  exit 1
}

rm -rf "$demo"; mkdir -p "$demo"
say "building go-spiffe's spiffe-tls example server and client"
go build -o "$bin/spiffe-tls-server" github.com/spiffe/go-spiffe/v2/examples/spiffe-tls/server
go build -o "$bin/spiffe-tls-client" github.com/spiffe/go-spiffe/v2/examples/spiffe-tls/client

say "starting a throwaway PostgreSQL in $demo/pg"
db=$(scripts/pg.sh start "$demo/pg")

say "configuring writd (trust domain example.org)"
"$bin/writd" gen-kek > "$demo/kek"; chmod 600 "$demo/kek"
cat > "$demo/writ.yaml" <<YAML
trust_domain: example.org
database_url: "$db"
listen:
  http: $http_addr
  grpc: $grpc_addr
admin:
  socket: $demo/admin/admin.sock
ca:
  kek_file: $demo/kek
log:
  format: text
YAML
export WRIT_ADMIN_SOCKET=$demo/admin/admin.sock

say "starting writd"
"$bin/writd" serve --config "$demo/writ.yaml" >"$demo/writd.log" 2>&1 & pids+=($!)
wait_http "http://$http_addr/readyz" writd
echo "writd is ready: http://$http_addr/bundle serves the trust bundle"

say "writ bundle show > bundle.json   (the agent's bootstrap trust)"
"$bin/writ" bundle show > "$demo/bundle.json"
head -c 300 "$demo/bundle.json"; echo " ..."

say "writ token create --spiffe-id spiffe://example.org/node/demo"
token=$("$bin/writ" token create --spiffe-id spiffe://example.org/node/demo | tee /dev/stderr | awk '/^Token:/ {print $2}')

say "writ entry create: one entry per example binary, selected by uid and binary path"
"$bin/writ" entry create --parent spiffe://example.org/node/demo --spiffe-id spiffe://example.org/server \
  --selector "unix:uid:$(id -u)" --selector "unix:path:$bin/spiffe-tls-server"
"$bin/writ" entry create --parent spiffe://example.org/node/demo --spiffe-id spiffe://example.org/client \
  --selector "unix:uid:$(id -u)" --selector "unix:path:$bin/spiffe-tls-client"

say "starting the node agent: writ-proxy --join-token ... --workload-api unix://$agent_sock"
rm -f "$agent_sock"
"$bin/writ-proxy" --control-plane "$grpc_addr" --join-token "$token" --trust-domain example.org \
  --trust-bundle "$demo/bundle.json" --workload-api "unix://$agent_sock" --admin-addr "$agent_admin" \
  --log-level info >"$demo/agent.log" 2>&1 & pids+=($!)
wait_http "http://$agent_admin/readyz" "writ-proxy (agent)"

say "go-spiffe's example server and client fetch their SVIDs and talk over mTLS"
"$bin/spiffe-tls-server" >"$demo/server.log" 2>&1 & pids+=($!)
ok=false
for _ in $(seq 1 50); do
  if "$bin/spiffe-tls-client" >"$demo/client.log" 2>&1; then ok=true; break; fi
  sleep 0.2
done
cat "$demo/client.log"
$ok || { echo "demo: the example client failed; see $demo/client.log and $demo/server.log" >&2; exit 1; }

say "writ cert list   (every identity issued or refused is on record)"
"$bin/writ" cert list --limit 10

cat <<MSG

Where to look:
  trust bundle      curl -s http://$http_addr/bundle
  metrics           curl -s http://$http_addr/metrics | grep writ_
  entries           WRIT_ADMIN_SOCKET=$WRIT_ADMIN_SOCKET $bin/writ entry list
  issuance log      WRIT_ADMIN_SOCKET=$WRIT_ADMIN_SOCKET $bin/writ cert list
  logs              $demo/*.log
MSG
if [ "${WRIT_DEMO_EXIT:-}" = 1 ]; then exit 0; fi
say "running; Ctrl-C stops everything"
wait "${pids[0]}"
