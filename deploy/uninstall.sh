#!/usr/bin/env bash
# Removes what deploy/install.sh installed. The spool (/var/lib/edgespool: windows not
# uploaded yet) and the configuration stay unless --purge is given.
#
#   sudo deploy/uninstall.sh [--purge]
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "uninstall.sh: run as root (sudo)" >&2
    exit 1
fi
purge=false
if [ "${1:-}" = "--purge" ]; then purge=true; fi

if [ -e /etc/systemd/system/edgespool.service ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now edgespool.service || true
    else
        systemctl disable edgespool.service || true
    fi
    rm -f /etc/systemd/system/edgespool.service
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
fi
rm -f /usr/bin/edgespool
if $purge; then
    rm -rf /var/lib/edgespool /etc/edgespool
    if getent passwd edgespool >/dev/null; then userdel edgespool; fi
    if getent group edgespool >/dev/null; then groupdel edgespool; fi
    echo "edgespool removed, with its spool, configuration and user"
else
    echo "edgespool removed; kept /var/lib/edgespool (the spool) and /etc/edgespool (sudo deploy/uninstall.sh --purge deletes them)"
fi
