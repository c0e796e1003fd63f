#!/usr/bin/env bash
# A private PostgreSQL server on loopback for the budget-store tests, from Debian's
# `postgresql` package (installed here when missing).
#   bash scripts/postgres.sh start   # prints the server's URL on stdout
#   bash scripts/postgres.sh stop    # stops it and removes its data directory
# It listens on 127.0.0.1; RELAY_PG_LISTEN=ADDRESS RELAY_PG_TRUST=CIDR adds an address to listen
# on and a network whose clients it trusts (the multi-host test's network namespaces); the
# printed URL then names that address.
set -euo pipefail
PORT=${RELAY_PG_PORT:-55432}
DATA=${RELAY_PG_DIR:-/tmp/relay-agents-pg-$PORT}
LISTEN=${RELAY_PG_LISTEN:-}
TRUST=${RELAY_PG_TRUST:-}

pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

as_owner() {
  # PostgreSQL refuses to run as root: run it as the `postgres` user the package creates.
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    if [ -z "$(pg_bin)" ]; then
      if [ "$(id -u)" -ne 0 ]; then
        echo "PostgreSQL is not installed: sudo apt-get install -y postgresql" >&2
        exit 1
      fi
      echo "installing Debian's postgresql package" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }
    fi
    BIN=$(pg_bin)
    USER_NAME=$([ "$(id -u)" -eq 0 ] && echo postgres || id -un)
    if ! as_owner "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
      rm -rf "$DATA"
      mkdir -p "$DATA"
      [ "$(id -u)" -eq 0 ] && chown postgres: "$DATA"
      as_owner "$BIN/initdb" -D "$DATA/data" -U "$USER_NAME" --auth=trust -E UTF8 >"$DATA/initdb.log" 2>&1 \
        || { cat "$DATA/initdb.log" >&2; exit 1; }
      if [ -n "$TRUST" ]; then
        echo "host all all $TRUST trust" >>"$DATA/data/pg_hba.conf"
      fi
      as_owner "$BIN/pg_ctl" -D "$DATA/data" -l "$DATA/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1${LISTEN:+,$LISTEN} -p $PORT -k $DATA -c max_connections=200 -c fsync=off" start >&2 \
        || { cat "$DATA/server.log" >&2; exit 1; }
      as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" relay
    fi
    echo "postgresql://$USER_NAME@${LISTEN:-127.0.0.1}:$PORT/relay"
    ;;
  stop)
    BIN=$(pg_bin)
    if [ -n "$BIN" ] && [ -d "$DATA/data" ]; then
      as_owner "$BIN/pg_ctl" -D "$DATA/data" -m fast -w stop >&2 || true
    fi
    rm -rf "$DATA"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
