#!/usr/bin/env bash
# The dashboard's browser test: starts `./deploy.sh --local` on free ports in
# a temporary directory, drives Debian's chromium (headless) through /ui with
# puppeteer-core (scripts/ui-test.js), then stops the stack (SIGINT, as
# Ctrl-C would) and checks that it stopped. Exits non-zero if a check fails.
#
# The test logs in with an admin token, finds a key written through the API
# in the key browser, makes a dead job (the data Redis refuses writes while
# a worker with KVQ_WORKER_MAX_ATTEMPTS=2 runs it) and retries it with the
# page's button, and watches the charts move while writes arrive. It saves
# screenshots at 1280x800 and at phone size (390x844) under
# target/ui-screenshots/.
#
# Installs chromium, node and npm from Debian's packages when missing, and
# puppeteer-core (which never downloads a browser) under .local/tools/ui.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

PUPPETEER_CORE_VERSION=24.43.1

need_redis
need_command curl curl
need_command node nodejs
need_command npm npm
need_command chromium chromium

tools=.local/tools/ui
if ! grep -qs "\"version\": \"$PUPPETEER_CORE_VERSION\"" "$tools/node_modules/puppeteer-core/package.json"; then
  echo "ui: installing puppeteer-core $PUPPETEER_CORE_VERSION under $tools..." >&2
  mkdir -p "$tools"
  PUPPETEER_SKIP_DOWNLOAD=1 npm install --prefix "$tools" --no-audit --no-fund \
    --loglevel=error "puppeteer-core@$PUPPETEER_CORE_VERSION" >&2
fi

# The stack runs with kvq's defaults, whatever this shell has set, but for
# a worker that gives up after two attempts (so a job dies quickly).
while IFS= read -r var; do
  case $var in
    KVQ_*) unset "$var" ;;
  esac
done < <(compgen -e)
export KVQ_WORKER_MAX_ATTEMPTS=2

read -ra ports < <(free_ports 4)
export KVQ_LOCAL_DIR
KVQ_LOCAL_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kvq-ui.XXXXXX")
export KVQ_LOCAL_KV_PORT=${ports[0]}
export KVQ_LOCAL_QUEUE_PORT=${ports[1]}
export KVQ_LOCAL_API_PORT=${ports[2]}
export KVQ_LOCAL_WORKER_HEALTH_PORT=${ports[3]}
out="$KVQ_LOCAL_DIR/deploy.out"

# Job control on: a background job of a script otherwise ignores SIGINT.
set -m
./deploy.sh --local >"$out" 2>&1 &
deploy=$!
set +m

trap 'stop_local_stack "$deploy" ui || true' EXIT

wait_local_stack "$out" "$deploy" ui || exit 1
wait_http "http://127.0.0.1:$KVQ_LOCAL_API_PORT/readyz" 30

mint() {
  KVQ_AUTH_JWT_SECRET=$(cat "$KVQ_LOCAL_DIR/jwt-secret") \
    target/release/kvq-api token --role "$1" --ttl 1h | tail -n 1
}

status=0
KVQ_UI_BASE="http://127.0.0.1:$KVQ_LOCAL_API_PORT" \
  KVQ_UI_ADMIN_TOKEN=$(mint admin) \
  KVQ_UI_WRITER_TOKEN=$(mint writer) \
  KVQ_UI_KV_PORT=$KVQ_LOCAL_KV_PORT \
  KVQ_UI_SCREENSHOTS=$PWD/target/ui-screenshots \
  KVQ_UI_CHROMIUM=$(command -v chromium) \
  NODE_PATH=$PWD/$tools/node_modules \
  node scripts/ui-test.js || status=$?

trap - EXIT
stop_local_stack "$deploy" ui || status=1
if [ "$status" -ne 0 ]; then
  echo "ui: FAILED (stack logs kept in $KVQ_LOCAL_DIR/logs)" >&2
  exit "$status"
fi
rm -rf "$KVQ_LOCAL_DIR"
echo "ui: every browser check passed; screenshots in target/ui-screenshots; the stack stopped cleanly"
