#!/usr/bin/env bash
# Runs every kvq test: unit and integration tests (real redis-server, real
# kvq-api and kvq-worker processes), then a smoke run of `./deploy.sh --local`
# and a schemathesis fuzz pass against the API's OpenAPI document.
# Installs what it needs (redis-server, redis-tools, curl) from Debian's
# packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

need_redis
need_command curl curl

log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo build --workspace --bins
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
smoke_passed=0
./scripts/smoke-local.sh && smoke_passed=1
fuzz_passed=0
./scripts/fuzz.sh && fuzz_passed=1

# One closing line for the whole run: cargo's per-binary counts plus the
# smoke run and the fuzz pass.
passed=$(grep -o '[0-9]* passed' "$log" | awk '{n += $1} END {print n + 0}')
failed=$(grep -o '[0-9]* failed' "$log" | awk '{n += $1} END {print n + 0}')
echo "tests: $((passed + smoke_passed + fuzz_passed)) passed, $((failed + 2 - smoke_passed - fuzz_passed)) failed"
[ "$smoke_passed" = 1 ] && [ "$fuzz_passed" = 1 ]
