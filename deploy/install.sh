#!/usr/bin/env bash
# Installs a plain edgespool binary as a systemd service, as the .deb does:
#
#   sudo deploy/install.sh [path/to/edgespool]     # default: the binary next to this
#                                                  # script, else target/release/edgespool
#
# The binary to /usr/bin, the unit to /etc/systemd/system, the configuration to
# /etc/edgespool/edgespool.toml (kept if present), a system user `edgespool` in the
# groups for serial, I2C and GPIO devices; then the unit is enabled and started.
# deploy/uninstall.sh undoes it (keeping the spool unless --purge).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo)" >&2
    exit 1
fi
binary="${1:-}"
if [ -z "$binary" ]; then
    for candidate in "$here/edgespool" "$here/../target/release/edgespool"; do
        if [ -x "$candidate" ]; then binary="$candidate"; break; fi
    done
fi
if [ -z "$binary" ] || [ ! -x "$binary" ]; then
    echo "install.sh: no edgespool binary; give its path (deploy/build-pi.sh or cargo build --release makes one)" >&2
    exit 1
fi
if ! "$binary" --version >/dev/null 2>&1; then
    echo "install.sh: $binary does not run on this machine (built for another target?)" >&2
    exit 1
fi

install -m 0755 "$binary" /usr/bin/edgespool
if ! getent passwd edgespool >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/edgespool --no-create-home \
        --shell /usr/sbin/nologin --comment "edgespool agent" edgespool
fi
for group in dialout i2c gpio; do
    if getent group "$group" >/dev/null; then usermod -a -G "$group" edgespool; fi
done
install -d -m 0755 /etc/edgespool
install -d -m 0700 /etc/edgespool/credentials
if [ ! -e /etc/edgespool/edgespool.toml ]; then
    install -m 0640 -g edgespool "$here/edgespool.toml" /etc/edgespool/edgespool.toml
else
    echo "install.sh: keeping the existing /etc/edgespool/edgespool.toml"
fi
/usr/bin/edgespool check-config --config /etc/edgespool/edgespool.toml >/dev/null
install -m 0644 "$here/edgespool.service" /etc/systemd/system/edgespool.service
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now edgespool.service
    echo "edgespool installed and started: systemctl status edgespool; sudo edgespool status"
else
    # Not booted with systemd (a container, a chroot): enable it for the next boot.
    systemctl enable edgespool.service
    echo "edgespool installed and enabled; systemd is not running here, so it starts at the next boot"
fi
