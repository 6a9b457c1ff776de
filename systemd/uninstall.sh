#!/usr/bin/env bash
# Stop and remove the service and the installed copy; the store and audit log in /var/lib/edge-access and
# the config in /etc/edge-access are kept (delete them by hand to erase all enrolments).
set -euo pipefail
PREFIX=${PREFIX:-/opt/edge-access}
if [ "$(id -u)" -ne 0 ]; then echo "uninstall: run as root (sudo make uninstall)" >&2; exit 2; fi
systemctl disable --now edge-access.service edge-access-web.service 2>/dev/null || true
rm -f /etc/systemd/system/edge-access.service /etc/systemd/system/edge-access-web.service
rm -rf /etc/systemd/system/edge-access.service.d
systemctl daemon-reload || true
rm -rf "$PREFIX"
echo "uninstall: removed; kept /var/lib/edge-access (enrolments, audit log) and /etc/edge-access" >&2
