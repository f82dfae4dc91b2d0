#!/usr/bin/env bash
# Runs the Postman collection (postman/) with newman against a stack started
# by `./deploy.sh --local` on free ports in a temporary directory, then stops
# the stack (SIGINT, as Ctrl-C would) and checks that it stopped. Exits
# non-zero if any assertion fails.
#
# Uses `newman` from PATH, else installs newman 6 under .local/tools (npm;
# node and npm come from Debian's packages when missing). The stack gets kvq's
# default settings: every KVQ_* variable except KVQ_LOCAL_WORKERS is ignored,
# since the collection's assertions rely on the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

need_command curl curl
need_command node nodejs
need_command npm npm

newman=$(command -v newman || true)
if [ -z "$newman" ]; then
  newman=.local/tools/node_modules/.bin/newman
  if [ ! -x "$newman" ]; then
    echo "postman: installing newman 6 under .local/tools..." >&2
    npm install --prefix .local/tools --no-audit --no-fund --loglevel=error newman@6 >&2
  fi
fi

# The stack runs with kvq's defaults, whatever this shell has set.
while IFS= read -r var; do
  case $var in
    KVQ_LOCAL_WORKERS) ;;
    KVQ_*) unset "$var" ;;
  esac
done < <(compgen -e)

# Four distinct free ports, never the defaults (other stacks may use them).
read -ra ports < <(free_ports 4)
export KVQ_LOCAL_DIR
KVQ_LOCAL_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kvq-postman.XXXXXX")
export KVQ_LOCAL_KV_PORT=${ports[0]}
export KVQ_LOCAL_QUEUE_PORT=${ports[1]}
export KVQ_LOCAL_API_PORT=${ports[2]}
export KVQ_LOCAL_WORKER_HEALTH_PORT=${ports[3]}
base="http://127.0.0.1:$KVQ_LOCAL_API_PORT"
out="$KVQ_LOCAL_DIR/deploy.out"

# Job control on: a background job of a script otherwise ignores SIGINT.
set -m
./deploy.sh --local >"$out" 2>&1 &
deploy=$!
set +m

trap 'stop_local_stack "$deploy" postman || true' EXIT

wait_local_stack "$out" "$deploy" postman || exit 1
wait_http "$base/readyz" 30

mint() {
  KVQ_AUTH_JWT_SECRET=$(cat "$KVQ_LOCAL_DIR/jwt-secret") \
    target/release/kvq-api token --role "$1" --ttl 1h | tail -n 1
}
writer=$(mint writer)
reader=$(mint reader)
admin=$(mint admin)

status=0
"$newman" run postman/kvq.postman_collection.json \
  --environment postman/local.postman_environment.json \
  --env-var "base_url=$base" \
  --env-var "writer_token=$writer" \
  --env-var "reader_token=$reader" \
  --env-var "admin_token=$admin" \
  --timeout-request 30000 \
  --color off || status=$?

trap - EXIT
stop_local_stack "$deploy" postman || status=1
if [ "$status" -ne 0 ]; then
  echo "postman: FAILED (stack logs kept in $KVQ_LOCAL_DIR/logs)" >&2
  exit "$status"
fi
rm -rf "$KVQ_LOCAL_DIR"
echo "postman: every assertion passed; the stack stopped cleanly"
