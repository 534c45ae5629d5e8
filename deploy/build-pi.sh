#!/usr/bin/env bash
# Builds the release binary for a Raspberry Pi without Docker, with rustup's target and
# Debian's cross compiler as the linker (and for the C in SQLite, zstd and ring).
#
#   deploy/build-pi.sh armv7-unknown-linux-gnueabihf   # 32-bit Raspberry Pi OS (Pi 2 and later)
#   deploy/build-pi.sh aarch64-unknown-linux-gnu       # 64-bit Raspberry Pi OS (Pi 3, 4, 5, Zero 2)
#   deploy/build-pi.sh aarch64-unknown-linux-gnu --full   # every kind, as the .deb holds
#
# By default it builds the lean set (cargo feature `pi`: the local sink; the system,
# sysfs, http and mqtt sources; NDJSON, JSON-seq and CSV), which keeps less code
# resident; `--full` (or EDGESPOOL_FULL=1) builds every source, sink and format
# (docs/raspberry-pi.md, "Lean or full").
# Needs: rustup target add TARGET; apt install gcc-arm-linux-gnueabihf (armv7) or
# gcc-aarch64-linux-gnu (aarch64). With Docker, `cross build --release --target TARGET`
# does the same from cross.toml (and builds aarch64-unknown-linux-musl, a static binary).
# The binary lands in target/TARGET/release/edgespool; extra arguments go to cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
case "$target" in
    armv7-unknown-linux-gnueabihf) gcc=arm-linux-gnueabihf-gcc; package=gcc-arm-linux-gnueabihf ;;
    aarch64-unknown-linux-gnu) gcc=aarch64-linux-gnu-gcc; package=gcc-aarch64-linux-gnu ;;
    aarch64-unknown-linux-musl)
        echo "build-pi.sh: $target needs a musl cross compiler, which Debian does not package;" >&2
        echo "use 'cross build --release --target $target -p edgespool' (Docker) instead." >&2
        exit 2 ;;
    *)
        echo "usage: deploy/build-pi.sh armv7-unknown-linux-gnueabihf|aarch64-unknown-linux-gnu [--full] [cargo args...]" >&2
        exit 2 ;;
esac
shift
features=(--no-default-features --features pi)
set_name="lean (features: pi)"
if [ "${1:-}" = "--full" ] || [ "${EDGESPOOL_FULL:-0}" = 1 ]; then
    [ "${1:-}" = "--full" ] && shift
    features=()
    set_name="full (every feature)"
fi

if ! command -v "$gcc" >/dev/null; then
    echo "build-pi.sh: $gcc not found: sudo apt install $package" >&2
    exit 1
fi
if ! rustup target list --installed | grep -qx "$target"; then
    echo "build-pi.sh: the Rust target $target is not installed: rustup target add $target" >&2
    exit 1
fi

upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
lower=$(echo "$target" | tr '-' '_')
export "CARGO_TARGET_${upper}_LINKER=$gcc"
export "CC_${lower}=$gcc"
export "AR_${lower}=${gcc%-gcc}-ar"

cargo build --locked --release --target "$target" -p edgespool "${features[@]}" "$@"
binary="target/$target/release/edgespool"
echo "built $binary, $set_name ($(stat -c %s "$binary") bytes)"
