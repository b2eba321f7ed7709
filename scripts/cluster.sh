#!/usr/bin/env bash
# A local MedView cluster on loopback ports: an S3 object store (SeaweedFS), a shared
# catalogue database (PostgreSQL when `medview-server serve --database` exists, else the
# store's SQLite file, which the replicas on one machine share), N `medview-server serve`
# replicas and nginx in front (deploy/nginx.conf).
#
#   scripts/cluster.sh up|down|status
#
# Environment (all optional):
#   MEDVIEW_CLUSTER_DIR       working directory (default /tmp/medview-cluster)
#   MEDVIEW_CLUSTER_PORT      nginx's port (default 8090); replicas use the next ports
#   MEDVIEW_REPLICAS          number of replicas (default 2)
#   MEDVIEW_CLUSTER_USER / MEDVIEW_CLUSTER_PASSWORD   the user created (medview / medview-cluster)
#   MEDVIEW_CLUSTER_SAMPLE=1  put the sample CT into the store on first `up`
#   MEDVIEW_CLUSTER_POSTGRES=0  use the shared SQLite file even if --database exists
#
# Then: ./run.sh --server http://127.0.0.1:8090 (log in as medview).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$PWD"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
DIR="${MEDVIEW_CLUSTER_DIR:-/tmp/medview-cluster}"
PORT="${MEDVIEW_CLUSTER_PORT:-8090}"
N="${MEDVIEW_REPLICAS:-2}"
USER_NAME="${MEDVIEW_CLUSTER_USER:-medview}"
PASSWORD="${MEDVIEW_CLUSTER_PASSWORD:-medview-cluster}"
BUCKET="medview-cluster"
STORE="$DIR/store"
PIDS="$DIR/pids"
LIMIT_S="${MEDVIEW_CLUSTER_WAIT_S:-180}"

log() { echo "[cluster] $*" >&2; }

alive() {   # alive PIDFILE: the process runs (a zombie, killed but not reaped, does not)
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null \
    && ! grep -q '^State:.*zombie' "/proc/$(cat "$1")/status" 2>/dev/null
}

wait_for() {   # wait_for DESCRIPTION COMMAND... : poll until the command succeeds
  local what="$1"; shift
  local deadline=$((SECONDS + LIMIT_S))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "$what did not come up within ${LIMIT_S}s"; return 1; fi
    sleep 0.2
  done
}

health() { curl -fsS --max-time 5 "http://127.0.0.1:$1/api/health" >/dev/null; }

s3_env() {
  export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION=us-east-1
  AWS_ACCESS_KEY_ID="$("$PY" -c 'import sys; sys.path.insert(0, "tests"); import seaweed; print(seaweed.ACCESS_KEY)')"
  AWS_SECRET_ACCESS_KEY="$("$PY" -c 'import sys; sys.path.insert(0, "tests"); import seaweed; print(seaweed.SECRET_KEY)')"
  export MEDVIEW_S3_ENDPOINT
  MEDVIEW_S3_ENDPOINT="$(cat "$DIR/seaweed.endpoint")"
}

db_args=()
use_postgres() {
  [ "${MEDVIEW_CLUSTER_POSTGRES:-1}" = 1 ] && "$PY" -m server.cli serve --help 2>/dev/null | grep -q -- "--database"
}

start_postgres() {
  local bin; bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  local pgport=$((PORT + 50))
  if [ ! -d "$DIR/pg/data" ]; then
    mkdir -p "$DIR/pg"
    chown -R postgres "$DIR/pg" 2>/dev/null || true
    run_pg "$bin/initdb" -D "$DIR/pg/data" -A trust -U medview >/dev/null
  fi
  if ! run_pg "$bin/pg_ctl" -D "$DIR/pg/data" status >/dev/null 2>&1; then
    run_pg "$bin/pg_ctl" -D "$DIR/pg/data" -l "$DIR/pg/log" -w -o \
      "-p $pgport -k $DIR/pg -c listen_addresses=127.0.0.1" start >/dev/null
    run_pg "$bin/createdb" -h 127.0.0.1 -p "$pgport" -U medview medview 2>/dev/null || true
  fi
  db_args=(--database "postgresql://medview@127.0.0.1:$pgport/medview")
}

run_pg() {   # PostgreSQL refuses to run as root
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; else "$@"; fi
}

up() {
  mkdir -p "$DIR" "$PIDS" "$DIR/nginx/tmp"
  bash scripts/apt-ensure.sh nginx-light curl
  # 1. the object store
  if ! alive "$PIDS/seaweed.pid"; then
    rm -f "$DIR/seaweed.endpoint"
    mkdir -p "$DIR/seaweed"
    "$PY" tests/seaweed.py "$DIR/seaweed" >"$DIR/seaweed.endpoint.tmp" 2>"$DIR/seaweed.err" &
    echo $! >"$PIDS/seaweed.pid"
    wait_for "SeaweedFS" test -s "$DIR/seaweed.endpoint.tmp"
    mv "$DIR/seaweed.endpoint.tmp" "$DIR/seaweed.endpoint"
  fi
  s3_env
  log "S3 at $MEDVIEW_S3_ENDPOINT"
  # 2. the database
  if use_postgres; then start_postgres; log "PostgreSQL: ${db_args[1]}"; else log "SQLite: $STORE/catalogue.sqlite (shared)"; fi
  # 3. the store (its objects in the bucket), a user
  if [ ! -f "$STORE/objects.json" ]; then
    "$PY" -m server.cli fsck --store "$STORE" --objects "s3://$BUCKET/store" "${db_args[@]}" >/dev/null
    printf '%s\n' "$PASSWORD" | "$PY" -m server.cli user add "$USER_NAME" --store "$STORE" \
      --password-stdin "${db_args[@]}" >/dev/null
    "$PY" -m server.cli user grant "$USER_NAME" --store "$STORE" "${db_args[@]}" >/dev/null
    if [ "${MEDVIEW_CLUSTER_SAMPLE:-0}" = 1 ]; then
      "$PY" -m server.cli sample --store "$STORE" "${db_args[@]}"
    fi
  fi
  # 4. the replicas
  local upstreams=""
  for i in $(seq 1 "$N"); do
    local p=$((PORT + i))
    upstreams+="server 127.0.0.1:$p max_fails=1 fail_timeout=2s; "
    if ! alive "$PIDS/replica$i.pid"; then
      "$PY" -m server.cli serve --store "$STORE" --port "$p" --host 127.0.0.1 \
        --trusted-proxy 127.0.0.1/32 --log-level warning "${db_args[@]}" \
        >>"$DIR/replica$i.log" 2>&1 &
      echo $! >"$PIDS/replica$i.pid"
    fi
  done
  for i in $(seq 1 "$N"); do wait_for "replica $i" health $((PORT + i)); done
  # 5. nginx
  sed -e "s|@PREFIX@|$DIR/nginx|g" -e "s|@LISTEN@|127.0.0.1:$PORT|g" \
      -e "s|@UPSTREAMS@|$upstreams|g" deploy/nginx.conf >"$DIR/nginx/nginx.conf"
  # started as root, nginx's workers would run as "nobody", who cannot write request
  # bodies into a private working directory: they run as the user who runs this script
  local g=()
  [ "$(id -u)" = 0 ] && g=(-g "user $(id -un);")
  if alive "$DIR/nginx/nginx.pid"; then
    nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" "${g[@]}" -s reload
  else
    nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" "${g[@]}"
  fi
  wait_for "nginx" health "$PORT"
  echo "http://127.0.0.1:$PORT"
  log "up: $N replicas behind http://127.0.0.1:$PORT (user $USER_NAME); desktop: ./run.sh --server http://127.0.0.1:$PORT"
}

stop_pid() {   # stop_pid PIDFILE: SIGTERM, wait, then SIGKILL
  local f="$1"
  if alive "$f"; then
    local pid; pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  if [ -f "$DIR/nginx/nginx.pid" ]; then stop_pid "$DIR/nginx/nginx.pid"; fi
  for f in "$PIDS"/replica*.pid; do [ -e "$f" ] && stop_pid "$f"; done
  stop_pid "$PIDS/seaweed.pid"
  if [ -d "$DIR/pg/data" ]; then
    local bin; bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    run_pg "$bin/pg_ctl" -D "$DIR/pg/data" -m fast stop >/dev/null 2>&1 || true
  fi
  log "down (data kept in $DIR; remove it for a fresh cluster)"
}

status() {
  local rc=0
  if alive "$PIDS/seaweed.pid"; then echo "seaweedfs  up   $(cat "$DIR/seaweed.endpoint" 2>/dev/null)"; else echo "seaweedfs  DOWN"; rc=1; fi
  for f in "$PIDS"/replica*.pid; do
    [ -e "$f" ] || continue
    local i; i="$(basename "$f" .pid)"; i="${i#replica}"
    if alive "$f" && health $((PORT + i)); then echo "replica $i  up   http://127.0.0.1:$((PORT + i))"; else echo "replica $i  DOWN"; rc=1; fi
  done
  if alive "$DIR/nginx/nginx.pid" && health "$PORT"; then echo "nginx      up   http://127.0.0.1:$PORT"; else echo "nginx      DOWN"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
