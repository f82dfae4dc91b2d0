#!/usr/bin/env bash
# Deploys kvq.
#
#   ./deploy.sh --local   the whole stack as local processes: two Redis servers
#                         (data and queue), kvq-api and kvq-worker, built in
#                         release mode; Ctrl-C stops everything.
#
# Local settings (environment): KVQ_LOCAL_DIR (state and logs, default
# ./.local), KVQ_LOCAL_KV_PORT (6379), KVQ_LOCAL_QUEUE_PORT (6380),
# KVQ_LOCAL_API_PORT (8080), KVQ_LOCAL_WORKER_HEALTH_PORT (9091),
# KVQ_LOCAL_WORKERS (1). Any KVQ_* setting of kvq itself is passed through.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

run_local() {
  local dir=${KVQ_LOCAL_DIR:-$PWD/.local}
  local kv_port=${KVQ_LOCAL_KV_PORT:-6379}
  local queue_port=${KVQ_LOCAL_QUEUE_PORT:-6380}
  local api_port=${KVQ_LOCAL_API_PORT:-8080}
  local health_port=${KVQ_LOCAL_WORKER_HEALTH_PORT:-9091}
  local workers=${KVQ_LOCAL_WORKERS:-1}

  need_redis
  need_command curl curl
  local var port
  for var in KVQ_LOCAL_KV_PORT KVQ_LOCAL_QUEUE_PORT KVQ_LOCAL_API_PORT KVQ_LOCAL_WORKER_HEALTH_PORT; do
    case $var in
      KVQ_LOCAL_KV_PORT) port=$kv_port ;;
      KVQ_LOCAL_QUEUE_PORT) port=$queue_port ;;
      KVQ_LOCAL_API_PORT) port=$api_port ;;
      *) port=$health_port ;;
    esac
    if port_in_use "$port"; then
      echo "error: port $port is in use; set $var to a free port" >&2
      exit 1
    fi
  done

  echo "building release binaries..."
  cargo build --release --bins --quiet
  mkdir -p "$dir/redis-kv" "$dir/redis-queue" "$dir/logs"

  local pids=()
  stop() {
    trap - INT TERM EXIT
    echo
    echo "stopping kvq..."
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    redis-cli -p "$kv_port" shutdown >/dev/null 2>&1 || true
    redis-cli -p "$queue_port" shutdown >/dev/null 2>&1 || true
    echo "stopped"
  }
  trap stop EXIT
  trap 'exit 130' INT TERM

  # Append-only persistence, so data and queued jobs survive a restart.
  local role
  for role in kv queue; do
    port=$kv_port
    [ "$role" = queue ] && port=$queue_port
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir/redis-$role" \
      --appendonly yes --appendfsync everysec --save "" \
      --logfile "$dir/logs/redis-$role.log" --daemonize yes
  done

  export KVQ_KV_REDIS_URL="redis://127.0.0.1:$kv_port"
  export KVQ_QUEUE_REDIS_URL="redis://127.0.0.1:$queue_port"
  export KVQ_BIND="127.0.0.1:$api_port"
  export KVQ_LOG_FORMAT=${KVQ_LOG_FORMAT:-json}
  # A token secret of this deployment's own, kept with its data.
  if [ -z "${KVQ_AUTH_JWT_SECRET:-}" ] && [ "${KVQ_AUTH_DISABLED:-false}" != true ]; then
    if [ ! -s "$dir/jwt-secret" ]; then
      (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/jwt-secret")
    fi
    KVQ_AUTH_JWT_SECRET=$(cat "$dir/jwt-secret")
    export KVQ_AUTH_JWT_SECRET
  fi

  target/release/kvq-api >>"$dir/logs/kvq-api.log" 2>&1 &
  pids+=($!)
  local i
  for i in $(seq 1 "$workers"); do
    KVQ_WORKER_HEALTH_BIND="127.0.0.1:$((health_port + i - 1))" \
      target/release/kvq-worker >>"$dir/logs/kvq-worker-$i.log" 2>&1 &
    pids+=($!)
  done

  wait_http "http://127.0.0.1:$api_port/readyz" 30
  wait_http "http://127.0.0.1:$health_port/healthz" 30
  local base="http://127.0.0.1:$api_port" token=""
  if [ -n "${KVQ_AUTH_JWT_SECRET:-}" ]; then
    token=$(target/release/kvq-api token --role writer --ttl 24h | tail -n 1)
  fi
  cat <<INFO

kvq is running at $base  (logs: $dir/logs, Ctrl-C stops everything)

A writer token, valid 24 h (\`target/release/kvq-api token --role ROLE\` mints more):
  export KVQ_TOKEN=$token

  curl -s -X POST $base/v1/kv -H "Authorization: Bearer \$KVQ_TOKEN" \\
       -H 'Content-Type: application/json' -d '{"key":"greeting","value":"hello"}'
  curl -s $base/v1/kv/greeting -H "Authorization: Bearer \$KVQ_TOKEN"
INFO
  # Stay up until Ctrl-C, or until a kvq process dies.
  while true; do
    for pid in "${pids[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "error: a kvq process ($pid) exited; see $dir/logs" >&2
        exit 1
      fi
    done
    sleep 1
  done
}

case "${1:-}" in
  --local) run_local ;;
  -h | --help) usage ;;
  *)
    usage >&2
    echo >&2
    echo "Kubernetes deployment is not built yet; use --local." >&2
    exit 2
    ;;
esac
