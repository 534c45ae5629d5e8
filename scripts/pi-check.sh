#!/usr/bin/env bash
# The Raspberry Pi step of CI (after scripts/test.sh): cross builds for aarch64 and armv7
# (the lean set, as deploy/build-pi.sh makes by default) run under qemu-user-static (--version, check-config, a short run whose files must
# land), the armv7 binary's size, the systemd unit (verify, security exposure), and the
# amd64 .deb's contents and maintainer scripts. A missing target or tool it cannot
# install fails the step, loudly. Nothing under qemu is timed: emulated CPU, memory and
# disk figures say nothing about a Pi, so only sizes are measured here.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "pi-check: FAILED: $*" >&2; exit 1; }
step() { echo "==> pi-check: $*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

# --- tools -------------------------------------------------------------------------
need_packages=()
for tool in arm-linux-gnueabihf-gcc:gcc-arm-linux-gnueabihf aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu \
            qemu-arm-static:qemu-user-static qemu-aarch64-static:qemu-user-static dpkg-deb:dpkg; do
    command -v "${tool%%:*}" >/dev/null || need_packages+=("${tool#*:}")
done
if [ ${#need_packages[@]} -gt 0 ]; then
    step "installing ${need_packages[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_packages[@]}" >/dev/null \
        || fail "cannot install ${need_packages[*]} (apt-get install needs root and the Debian registry)"
fi
targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
for target in "${targets[@]}"; do
    if ! rustup target list --installed | grep -qx "$target"; then
        step "rustup target add $target"
        rustup target add "$target" || fail "cannot install the Rust target $target"
    fi
done
if ! command -v cargo-deb >/dev/null; then
    step "cargo install cargo-deb"
    cargo install cargo-deb --locked --version 3.8.0 || fail "cannot install cargo-deb"
fi

# --- cross builds ------------------------------------------------------------------
for target in "${targets[@]}"; do
    step "build $target"
    deploy/build-pi.sh "$target" || fail "the $target build"
done
armv7_size=$(stat -c %s target/armv7-unknown-linux-gnueabihf/release/edgespool)
aarch64_size=$(stat -c %s target/aarch64-unknown-linux-gnu/release/edgespool)
# Sizes only: under qemu-user nothing here is a performance figure.
echo "binary sizes (lean): armv7 $armv7_size bytes, aarch64 $aarch64_size bytes"
[ "$armv7_size" -le 10000000 ] || fail "the armv7 binary is $armv7_size bytes, over 10 MB"

# --- under qemu --------------------------------------------------------------------
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

emulator() { # target: the command that runs its build under qemu (one word per field)
    case "$1" in
        aarch64-*) echo "env QEMU_LD_PREFIX=/usr/aarch64-linux-gnu qemu-aarch64-static target/$1/release/edgespool" ;;
        armv7-*) echo "env QEMU_LD_PREFIX=/usr/arm-linux-gnueabihf qemu-arm-static target/$1/release/edgespool" ;;
    esac
}
emulate() { # target args...
    local command
    read -r -a command <<<"$(emulator "$1")"
    shift
    "${command[@]}" "$@"
}

for target in "${targets[@]}"; do
    step "$target under qemu: --version, check-config"
    version=$(emulate "$target" --version) || fail "$target --version"
    [ "$version" = "edgespool $(cargo pkgid -p edgespool | sed 's/.*[#@]//')" ] || fail "$target --version said: $version"
    emulate "$target" check-config --config deploy/quickstart.toml >/dev/null || fail "$target check-config"
    # The quick-start configuration, with 1 s windows and no grace so a partition closes soon.
    mkdir -p "$work/$target"
    sed -e "s|edgespool-data|$work/$target|" -e 's|^window = .*|window = "1s"|' -e 's|^grace = .*|grace = "0s"|' \
        deploy/quickstart.toml > "$work/$target/edgespool.toml"
    emulate "$target" check-config --config "$work/$target/edgespool.toml" >/dev/null || fail "$target check-config (short run)"
done

# Start both in the last seconds of a minute: that partition closes a few seconds later.
second=$((10#$(date +%S)))
if [ "$second" -gt 50 ] || [ "$second" -lt 45 ]; then
    sleep $(( (105 - second) % 60 ))
fi
for target in "${targets[@]}"; do
    step "$target under qemu: a short run"
    # Not through `emulate`: a backgrounded function is a subshell, and SIGTERM must
    # reach qemu (which hands it to the agent) itself.
    read -r -a command <<<"$(emulator "$target")"
    "${command[@]}" run --config "$work/$target/edgespool.toml" >"$work/$target/agent.log" 2>&1 &
    pids+=($!)
done
deadline=$((SECONDS + 90))
for target in "${targets[@]}"; do
    until find "$work/$target/out" -name '*.ndjson' 2>/dev/null | grep -q .; do
        [ $SECONDS -lt $deadline ] || { cat "$work/$target/agent.log" >&2; fail "$target: no output file within 90 s"; }
        sleep 1
    done
    file=$(find "$work/$target/out" -name '*.ndjson' | head -1)
    grep -q '"series":"system.load1"' "$file" || fail "$target: $file has no system.load1 rows"
    echo "$target: $(wc -l < "$file") rows in ${file#"$work/$target/"}"
done
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid" || fail "an emulated agent did not stop cleanly on SIGTERM"; done
pids=()

# --- systemd unit ------------------------------------------------------------------
step "systemd unit"
if command -v systemd-analyze >/dev/null; then
    exposure=$(systemd-analyze security --offline=true deploy/edgespool.service 2>/dev/null \
        | sed -n 's/.*Overall exposure level for edgespool.service: \([0-9.]*\).*/\1/p')
    [ -n "$exposure" ] || fail "systemd-analyze security gave no exposure level"
    echo "exposure level: $exposure"
    awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "exposure $exposure is over 2.0"
    # verify needs the binary where ExecStart says: point it at the build.
    sed "s|/usr/bin/edgespool|$PWD/target/release/edgespool|" deploy/edgespool.service > "$work/edgespool.service"
else
    echo "pi-check: systemd-analyze is not on this machine: unit checks skipped" >&2
fi

# --- .deb --------------------------------------------------------------------------
step "cargo deb (amd64)"
cargo deb --locked -p edgespool >"$work/deb.log" 2>&1 || { cat "$work/deb.log" >&2; fail "cargo deb"; }
deb=$(ls -t target/debian/edgespool_*_amd64.deb | head -1)
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$work/edgespool.service" || fail "systemd-analyze verify"
fi
contents=$(dpkg-deb -c "$deb")
for path in ./usr/bin/edgespool ./etc/edgespool/edgespool.toml ./usr/share/doc/edgespool/raspberry-pi.md; do
    grep -q " $path\$" <<<"$contents" || fail "$deb lacks $path"
done
grep -Eq " \./(usr/)?lib/systemd/system/edgespool\.service\$" <<<"$contents" || fail "$deb lacks the unit"
grep -q "^-rw-r----- .* ./etc/edgespool/edgespool.toml\$" <<<"$contents" || fail "the configuration is not mode 0640"
mkdir "$work/control"
dpkg-deb -e "$deb" "$work/control"
grep -qx "/etc/edgespool/edgespool.toml" "$work/control/conffiles" || fail "the configuration is not a conffile"
grep -q "adduser --system --group" "$work/control/postinst" || fail "postinst creates no system user"
grep -q "deb-systemd-helper enable" "$work/control/postinst" || fail "postinst does not enable the unit"
grep -q 'rm -rf /var/lib/edgespool' "$work/control/postrm" || fail "postrm does not purge the spool"
awk '/if \[ "\$1" = "purge" \]/ { p = 1 } /rm -rf \/var\/lib\/edgespool/ && !p { bad = 1 } END { exit bad }' \
    "$work/control/postrm" || fail "postrm deletes the spool outside purge"
if [ -e "$work/control/prerm" ] && grep -q '/var/lib/edgespool' "$work/control/prerm"; then
    fail "prerm touches the spool"
fi
dpkg-deb -f "$deb" Depends | grep -q adduser || fail "the package does not depend on adduser"
echo "$deb: $(stat -c %s "$deb") bytes, $(grep -c '' <<<"$contents") entries"
step "all good"
