#!/usr/bin/env bash
# Validates the API's own OpenAPI document (`GET /openapi.json`) with
# openapi-spec-validator, then fuzzes the API with schemathesis against it:
# every check (no 5xx, every status, header, content
# type and body as documented, bad input rejected, good input accepted,
# 405 + Allow for undocumented methods, auth not ignored, ...).
#
# Starts its own stack on free ports (two redis-server, kvq-api with auth on
# and a throwaway secret, one kvq-worker) from target/debug (or
# target/$KVQ_FUZZ_PROFILE), installs schemathesis and openapi-spec-validator
# into .local/tools/ if missing, and stops everything it started on exit.
#
#   KVQ_FUZZ_MAX_EXAMPLES  test cases per operation and phase (default 100)
#   KVQ_FUZZ_SEED          schemathesis seed (default: random; printed)
#   KVQ_FUZZ_PROFILE       debug (default) or release binaries
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ST_VERSION=4.32.5
OSV_VERSION=0.9.0
st_venv=$PWD/.local/tools/schemathesis
profile=${KVQ_FUZZ_PROFILE:-debug}
bin=$PWD/target/$profile

need_redis
need_command curl curl
need_command python3 python3 python3-venv

if ! "$st_venv/bin/st" --version 2>/dev/null | grep -qF "$ST_VERSION"; then
  echo "fuzz: installing schemathesis $ST_VERSION into $st_venv" >&2
  python3 -m venv "$st_venv"
  "$st_venv/bin/pip" install -q "schemathesis==$ST_VERSION"
fi
if ! "$st_venv/bin/pip" show openapi-spec-validator 2>/dev/null | grep -qx "Version: $OSV_VERSION"; then
  echo "fuzz: installing openapi-spec-validator $OSV_VERSION into $st_venv" >&2
  "$st_venv/bin/pip" install -q "openapi-spec-validator==$OSV_VERSION"
fi
if [ ! -x "$bin/kvq-api" ] || [ ! -x "$bin/kvq-worker" ]; then
  if [ "$profile" = release ]; then
    cargo build --release --workspace --bins
  else
    cargo build --workspace --bins
  fi
fi

# No KVQ_* setting of the caller's leaks into the stack.
while read -r var; do
  unset "$var"
done < <(compgen -e | grep '^KVQ_' || true)

run=$(mktemp -d "${TMPDIR:-/tmp}/kvq-fuzz.XXXXXX")
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$status" -eq 0 ]; then
    rm -rf "$run"
  else
    echo "fuzz: logs and schemathesis' files kept in $run" >&2
  fi
}
trap cleanup EXIT

read -r kv_port queue_port api_port health_port < <(free_ports 4)
for port in "$kv_port" "$queue_port"; do
  mkdir -p "$run/redis-$port"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$run/redis-$port" >"$run/redis-$port.log" 2>&1 &
  pids+=("$!")
done
for port in "$kv_port" "$queue_port"; do
  for _ in $(seq 1 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$port" ping >/dev/null
done

export KVQ_KV_REDIS_URL=redis://127.0.0.1:$kv_port
export KVQ_QUEUE_REDIS_URL=redis://127.0.0.1:$queue_port
export KVQ_BIND=127.0.0.1:$api_port
export KVQ_WORKER_HEALTH_BIND=127.0.0.1:$health_port
export KVQ_AUTH_JWT_SECRET
KVQ_AUTH_JWT_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
export KVQ_LOG_FORMAT=json
token=$("$bin/kvq-api" token --role admin --ttl 1h | tail -n 1)

"$bin/kvq-api" >"$run/api.log" 2>&1 &
pids+=("$!")
"$bin/kvq-worker" >"$run/worker.log" 2>&1 &
pids+=("$!")
base=http://127.0.0.1:$api_port
wait_http "$base/readyz" 30
wait_http "http://127.0.0.1:$health_port/healthz" 30

# The document the API serves is a valid OpenAPI 3.1 document (client
# generators refuse one that is not: e.g. an operationId used twice).
curl -fsS "$base/openapi.json" >"$run/openapi.json"
if ! "$st_venv/bin/openapi-spec-validator" "$run/openapi.json"; then
  echo "fuzz: the served /openapi.json is not a valid OpenAPI document" >&2
  exit 1
fi

seed_args=()
if [ -n "${KVQ_FUZZ_SEED:-}" ]; then
  seed_args=(--seed "$KVQ_FUZZ_SEED")
fi
# Run from the run folder: schemathesis keeps its example database and
# crash files in the working directory. One schemathesis worker: the API,
# the worker and both Redis share the machine's cores with it (and with two
# workers, Python 3.11.7 once failed inside hypothesis with "AST
# constructor recursion depth mismatch"). No --max-response-time: this
# checks behaviour, not speed. A HAR of every request is kept on failure.
config=$PWD/scripts/schemathesis.toml
export SCHEMATHESIS_HOOKS=$PWD/scripts/schemathesis_hooks.py
status=0
(
  cd "$run"
  "$st_venv/bin/st" --config-file "$config" run "$base/openapi.json" \
    --checks all \
    -H "Authorization: Bearer $token" \
    --max-examples "${KVQ_FUZZ_MAX_EXAMPLES:-100}" \
    --workers 1 \
    --no-color \
    --report har --report-dir "$run/report" \
    "${seed_args[@]}"
) || status=$?

# kvq's own error lines (actix logs each unparsable request as an error:
# those are the fuzzer's doing, and answered 400).
if grep -h '"level":"ERROR"' "$run/api.log" "$run/worker.log" | grep -q '"target":"kvq'; then
  echo "fuzz: the API or the worker logged errors:" >&2
  grep -h '"level":"ERROR"' "$run/api.log" "$run/worker.log" | grep '"target":"kvq' | tail -n 20 >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "fuzz: schemathesis found failures (see above)" >&2
  exit "$status"
fi
echo "fuzz: schemathesis passed"
