#!/usr/bin/env bash
# Throwaway PostgreSQL cluster on a unix socket, for tests and the demo.
#   scripts/pg.sh start DIR   initdb (once) and start; prints the admin URL
#   scripts/pg.sh stop DIR    stop and keep DIR
#   scripts/pg.sh url DIR     print the admin URL
# PostgreSQL refuses to run as root: as root the cluster runs as "postgres".
set -euo pipefail

cmd=${1:?usage: pg.sh start|stop|url DIR}
dir=${2:?usage: pg.sh start|stop|url DIR}

bindir=${WRIT_PG_BINDIR:-}
if [ -z "$bindir" ]; then
  for v in 17 16 15 14; do
    if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then bindir=/usr/lib/postgresql/$v/bin; break; fi
  done
fi
if [ -z "$bindir" ] && command -v initdb >/dev/null; then bindir=$(dirname "$(command -v initdb)"); fi
if [ -z "$bindir" ]; then
  echo "pg.sh: PostgreSQL server binaries not found; install them (apt-get install postgresql-15) or set WRIT_PG_BINDIR" >&2
  exit 1
fi

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

url() {
  printf 'postgres://postgres@/postgres?host=%s&sslmode=disable\n' "$dir"
}

case "$cmd" in
start)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$bindir/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
  fi
  extra=${WRIT_PG_OPTS:-}
  as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-k $dir -c listen_addresses='' -c max_connections=300 $extra" start >/dev/null \
    || { cat "$dir/postgres.log" >&2; exit 1; }
  url
  ;;
stop)
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  fi
  ;;
url)
  dir=$(cd "$dir" && pwd)
  url
  ;;
*)
  echo "pg.sh: unknown command $cmd" >&2
  exit 2
  ;;
esac
