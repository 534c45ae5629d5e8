#!/usr/bin/env bash
# Late-rows benchmark: files per partition and bytes per file for a simulated day of one
# device with stragglers, with `late_grace` 0 (a part per flush that brings late rows, as
# before late_grace existed), 1 h (the default) and 3 h. Drives the real spool and the
# real Parquet encoder through agent/examples/late_files.rs (no server, no clock: the
# day is simulated, so the figures are the same on every machine and build).
#
#   scripts/bench-late.sh            # 10 series, seed 15 (docs/benchmarks.md)
#   BENCH_SERIES=50 BENCH_SEED=7 scripts/bench-late.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SERIES=${BENCH_SERIES:-10}
SEED=${BENCH_SEED:-15}
cargo build --quiet --example late_files
work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-late.XXXXXX")
trap 'rm -rf "$work"' EXIT
for grace in 0 3600 10800; do
    target/debug/examples/late_files "$work/spool-$grace.db" "$grace" "$SERIES" "$SEED"
done
