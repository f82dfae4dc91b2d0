#!/usr/bin/env bash
# Starts `./deploy.sh --local` on spare ports, writes and reads a key through
# it (with curl, then with the `kvq` command line), stops it with Ctrl-C
# (SIGINT) and checks that everything stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

export KVQ_LOCAL_DIR=${KVQ_LOCAL_DIR:-$(mktemp -d)}
export KVQ_LOCAL_KV_PORT=${KVQ_LOCAL_KV_PORT:-26379}
export KVQ_LOCAL_QUEUE_PORT=${KVQ_LOCAL_QUEUE_PORT:-26380}
export KVQ_LOCAL_API_PORT=${KVQ_LOCAL_API_PORT:-28080}
export KVQ_LOCAL_WORKER_HEALTH_PORT=${KVQ_LOCAL_WORKER_HEALTH_PORT:-29091}
base="http://127.0.0.1:$KVQ_LOCAL_API_PORT"
out="$KVQ_LOCAL_DIR/deploy.out"
mkdir -p "$KVQ_LOCAL_DIR"

# Job control on: a background job of a script otherwise ignores SIGINT,
# and Ctrl-C (SIGINT) is what this checks.
set -m
./deploy.sh --local >"$out" 2>&1 &
deploy=$!
set +m
cleanup() { kill -INT "$deploy" 2>/dev/null || true; }
trap cleanup EXIT

wait_local_stack "$out" "$deploy" smoke || exit 1

token=$(sed -n 's/^  export KVQ_TOKEN=//p' "$out")
auth=(-H "Authorization: Bearer $token")
if [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/v1/kv/smoke/1")" != 401 ]; then
  echo "smoke: a request without a token was not refused" >&2
  exit 1
fi
job=$(curl -fsS -X POST "$base/v1/kv" "${auth[@]}" -H 'Content-Type: application/json' \
  -d '{"key":"smoke/1","value":{"hello":"world"}}')
echo "smoke: accepted $job"
for _ in $(seq 1 100); do
  if curl -fsS "${auth[@]}" "$base/v1/kv/smoke/1" 2>/dev/null | grep -q '"hello":"world"'; then
    break
  fi
  sleep 0.1
done
curl -fsS "${auth[@]}" "$base/v1/kv/smoke/1" | grep -q '"version":1' || {
  echo "smoke: the write was not applied" >&2
  cat "$out" >&2
  exit 1
}

# The command line, configured as the deploy prints it.
cli=$(KVQ_TOKEN=$token KVQ_URL=$base target/release/kvq put smoke/2 '{"via":"kvq"}' --wait)
[ "$cli" = "created smoke/2, version 1" ] || {
  echo "smoke: kvq put answered: $cli" >&2
  exit 1
}
[ "$(KVQ_TOKEN=$token KVQ_URL=$base target/release/kvq get smoke/2)" = '{"via":"kvq"}' ] || {
  echo "smoke: kvq get did not read what kvq put wrote" >&2
  exit 1
}

trap - EXIT
stop_local_stack "$deploy" smoke || exit 1
echo "smoke: deploy.sh --local works (write applied, clean stop)"
