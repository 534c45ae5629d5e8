#!/usr/bin/env bash
# The whole test suite: unit tests, then end-to-end tests that run the built binary.
#
# It builds the agent once and the end-to-end tests reuse that build. Servers the tests
# need are installed and started here, on loopback only, when they are missing; the
# foundation's tests need none (they serve their own HTTP and fake sysfs in temp dirs).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo is missing; install the Rust toolchain with rustup first" >&2
    exit 1
fi

echo "==> building edgespool"
cargo build --locked -p edgespool

echo "==> unit and end-to-end tests"
export EDGESPOOL_BIN="$PWD/target/debug/edgespool"
cargo test --locked --workspace "$@"
