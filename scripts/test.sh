#!/usr/bin/env bash
# Runs every kvq test: unit and integration tests (real redis-server, real
# kvq-api and kvq-worker processes), then a smoke run of `./deploy.sh --local`,
# the Postman collection run by newman against `./deploy.sh --local`, the
# dashboard's browser test (headless chromium against `./deploy.sh --local`),
# and a schemathesis fuzz pass against the API's OpenAPI document. Installs
# what it needs (redis-server, redis-tools, curl, faketime for the tests that
# run workers with a clock ahead; node, npm and newman for the collection;
# chromium and puppeteer-core for the browser test; schemathesis from PyPI
# for the fuzz pass) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

need_redis
need_command curl curl
need_command faketime faketime

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Release, like the binaries users and outside checks run; it also means one
# build of the dependencies serves the tests, the smoke run, the Postman run
# and the benchmark.
cargo build --release --workspace --bins
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log"
smoke_passed=0
./scripts/smoke-local.sh && smoke_passed=1
postman_passed=0
./scripts/postman.sh && postman_passed=1
ui_passed=0
./scripts/ui-test.sh && ui_passed=1
fuzz_passed=0
KVQ_FUZZ_PROFILE=release ./scripts/fuzz.sh && fuzz_passed=1

# One closing line for the whole run: cargo's per-binary counts plus the
# smoke run, the Postman run, the browser test and the fuzz pass.
passed=$(grep -o '[0-9]* passed' "$log" | awk '{n += $1} END {print n + 0}')
failed=$(grep -o '[0-9]* failed' "$log" | awk '{n += $1} END {print n + 0}')
scripts_passed=$((smoke_passed + postman_passed + ui_passed + fuzz_passed))
echo "tests: $((passed + scripts_passed)) passed, $((failed + 4 - scripts_passed)) failed"
[ "$scripts_passed" = 4 ]
