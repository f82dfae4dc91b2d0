#!/usr/bin/env bash
# Runs the benchmark: installs wrk and redis-server/redis-tools when missing,
# builds the release binaries, and runs kvq-bench with the given arguments
# (--quick for a smoke run of about 75–90 s; --scaling for the scaling runs only;
# --out DIR for results.md + chart.svg).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

need_redis
need_command redis-benchmark redis-tools
need_command wrk wrk
cargo build --release --bins --quiet
exec target/release/kvq-bench "$@"
