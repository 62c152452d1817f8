#!/usr/bin/env bash
# make demo: a working Writ mesh on a throwaway PostgreSQL.
#
#   frontend ──> orders (v1 90 %, v2 10 %) ──> payments
#       └──────────────X (denied by policy) ─────┘
#
# Starts PostgreSQL and writd, applies scripts/demo/mesh.yaml, and runs
# four sample services (writ-demo-app), each behind its own writ-proxy:
# the proxy attests its node with a join token, gets the workload's SVID,
# takes its listeners, routes and clusters from writd over ADS, decides
# every inbound request with the Rego of policies/mesh, and writes each
# decision to its audit spool, shipped to writd and into PostgreSQL.
# Then it sends a small load and shows what happened: the split, a retry,
# the denials, and the audit trail. Ctrl-C stops everything.
#
#   WRIT_DEMO_EXIT=1       stop after the walkthrough instead of waiting
#   WRIT_DEMO_DIR          working dir (default .tmp/demo)
#   WRIT_DEMO_REQUESTS     requests in the load (default 200)
#   WRIT_DEMO_PORT_BASE    first of the local ports it uses (default 18000)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${WRIT_BIN_DIR:-$root/bin}
demo=${WRIT_DEMO_DIR:-$root/.tmp/demo}
requests=${WRIT_DEMO_REQUESTS:-200}
base=${WRIT_DEMO_PORT_BASE:-18000}
td=cluster.local
http_addr=127.0.0.1:$base
grpc_addr=127.0.0.1:$((base + 1))

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pids=()
cleanup() {
  say "stopping"
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  scripts/pg.sh stop "$demo/pg" >/dev/null 2>&1 || true
  echo "stopped; logs are in $demo"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # url, what
  for _ in $(seq 1 300); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "demo: $2 did not become ready; see $demo/*.log" >&2
  exit 1
}
writ() { "$bin/writ" "$@"; }

for b in writd writ writ-proxy writ-demo-app; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b is missing; run make build" >&2; exit 1; }
done
rm -rf "$demo"; mkdir -p "$demo"

say "starting a throwaway PostgreSQL in $demo/pg"
db=$(scripts/pg.sh start "$demo/pg")

say "starting writd (trust domain $td)"
"$bin/writd" gen-kek > "$demo/kek"; chmod 600 "$demo/kek"
cat > "$demo/writ.yaml" <<YAML
trust_domain: $td
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
"$bin/writd" serve --config "$demo/writ.yaml" >"$demo/writd.log" 2>&1 & pids+=($!)
wait_http "http://$http_addr/readyz" writd
writ bundle show > "$demo/bundle.json"

say "writ apply -f scripts/demo/mesh.yaml   (services, the 90/10 route with retries, authorization)"
writ apply -f scripts/demo/mesh.yaml

# name service version fail-every calls...
# Each workload gets its own node (a join token and an agent in its
# writ-proxy), so the demo shows one sidecar per workload as in production.
workloads=(
  "frontend frontend v1 0 orders=http://orders/ payments=http://payments/"
  "orders-v1 orders v1 10 payments=http://payments/"
  "orders-v2 orders v2 0 payments=http://payments/"
  "payments payments v1 0"
)
i=0
for w in "${workloads[@]}"; do
  read -r name svc version fail calls <<<"$w"
  app=127.0.0.1:$((base + 10 + i))
  mesh=127.0.0.1:$((base + 20 + i))
  proxy=127.0.0.1:$((base + 30 + i))
  admin=127.0.0.1:$((base + 40 + i))
  i=$((i + 1))
  mkdir -p "$demo/$name"
  say "$name: a join token, an entry for spiffe://$td/ns/shop/sa/$svc, the app and its writ-proxy"
  token=$(writ token create --spiffe-id "spiffe://$td/node/$name" | awk '/^Token:/ {print $2}')
  writ entry create --parent "spiffe://$td/node/$name" --spiffe-id "spiffe://$td/ns/shop/sa/$svc" \
    --selector "unix:uid:$(id -u)" --selector "unix:path:$bin/writ-proxy" >/dev/null
  args=()
  for c in $calls; do args+=(--call "$c"); done
  HTTP_PROXY=http://$proxy "$bin/writ-demo-app" serve --name "$svc" --version "$version" --listen "$app" \
    --fail-every "$fail" "${args[@]}" >"$demo/$name/app.log" 2>&1 & pids+=($!)
  WRIT_JOIN_TOKEN=$token "$bin/writ-proxy" --control-plane "$grpc_addr" --trust-domain $td \
    --trust-bundle "$demo/bundle.json" --workload-api "unix://$demo/$name/agent.sock" --admin-addr "$admin" \
    --xds-server "$grpc_addr" --inbound "$mesh" --app "$app" --version "$version" --http-proxy "$proxy" \
    --policy-dir policies/mesh --audit-spool-dir "$demo/$name/spool" \
    --access-log "$demo/$name/access.log" >"$demo/$name/proxy.log" 2>&1 & pids+=($!)
  echo "$name: app $app, mesh port $mesh (mTLS), HTTP proxy $proxy, admin http://$admin"
  eval "admin_$i=$admin"
done
for j in 1 2 3 4; do a="admin_$j"; wait_http "http://${!a}/readyz" "writ-proxy $j"; done
frontend_app=127.0.0.1:$((base + 10))

say "writ mesh endpoints   (registered by the sidecars over ADS)"
for _ in $(seq 1 100); do
  if [ "$(writ mesh endpoints | grep -c spiffe:// || true)" -ge 4 ]; then break; fi
  sleep 0.2
done
writ mesh endpoints

say "one request: curl http://$frontend_app/"
curl -sS "http://$frontend_app/"; echo

say "load: $requests requests to frontend (writ-demo-app load)"
"$bin/writ-demo-app" load --url "http://$frontend_app/" --requests "$requests" --concurrency 2
cat <<'TXT'
  - orders v1 and v2 answer about 90 % and 10 % of frontend's calls (the Route's split);
  - orders v1 fails every 10th request on purpose (503) and frontend's sidecar
    retries it (the Route says: 3 retries on 5xx);
  - frontend -> payments is denied by policies/mesh: only orders may call payments.
TXT

say "retries and decisions, from the sidecars' Prometheus metrics"
echo "# frontend's sidecar: retries by cluster, and requests by destination and code"
curl -s "http://$admin_1/metrics" | grep -E '^writ_upstream_retries_total|^writ_requests_total' || true
echo "# payments' sidecar: inbound decisions by caller"
curl -s "http://$admin_4/metrics" | grep -E '^writ_requests_total' || true

say "writ audit query --result deny --limit 5   (every decision is in PostgreSQL)"
for _ in $(seq 1 50); do
  if writ audit query --result deny --limit 1 2>/dev/null | grep -q deny; then break; fi
  sleep 0.2
done
writ audit query --result deny --limit 5

say "writ audit verify   (hash chains and signed checkpoints)"
writ audit verify || true

cat <<MSG

Where to look:
  sidecar metrics   curl -s http://$admin_1/metrics | grep writ_
  sidecar config    curl -s http://$admin_2/config_dump
  audit trail       WRIT_ADMIN_SOCKET=$WRIT_ADMIN_SOCKET $bin/writ audit query --since 10m
  mesh config       WRIT_ADMIN_SOCKET=$WRIT_ADMIN_SOCKET $bin/writ get route orders -n shop -o yaml
  change the split  edit scripts/demo/mesh.yaml, then writ apply -f scripts/demo/mesh.yaml
  more load         $bin/writ-demo-app load --url http://$frontend_app/ --requests 500
  logs              $demo/*.log $demo/*/*.log
MSG
if [ "${WRIT_DEMO_EXIT:-}" = 1 ]; then exit 0; fi
say "running; Ctrl-C stops everything"
wait "${pids[0]}"
