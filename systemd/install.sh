#!/usr/bin/env bash
# Install edge-access as a boot-time service: copy the project to PREFIX, build its venv and models there,
# create the unprivileged `edge-access` user (groups video, gpio), install the config, the unit and the drop-in
# that widens its sandbox for what the config uses (`python -m edge sandbox`).
set -euo pipefail
PREFIX=${PREFIX:-/opt/edge-access}
SRC=$(cd "$(dirname "$0")/.." && pwd)
VENV_FLAGS=${VENV_FLAGS:-}

if [ "$(id -u)" -ne 0 ]; then echo "install: run as root (sudo make install)" >&2; exit 2; fi
install -d -m 755 "$PREFIX"
cp -r "$SRC"/edge "$SRC"/engines "$SRC"/systemd "$SRC"/samples "$SRC"/Makefile "$SRC"/requirements.txt \
      "$SRC"/requirements-dev.txt "$SRC"/config.yaml "$SRC"/pyproject.toml "$SRC"/README.md "$PREFIX"/
[ -d "$SRC/models" ] && cp -r "$SRC/models" "$PREFIX"/
make -C "$PREFIX" models VENV_FLAGS="$VENV_FLAGS"
id -u edge-access >/dev/null 2>&1 || useradd --system --home-dir /var/lib/edge-access --shell /usr/sbin/nologin edge-access
for group in video gpio; do
  if getent group "$group" >/dev/null; then usermod -aG "$group" edge-access; else echo "install: no '$group' group on this system" >&2; fi
done
install -d -m 755 /etc/edge-access
[ -f /etc/edge-access/config.yaml ] || install -m 644 "$SRC/config.yaml" /etc/edge-access/config.yaml
sed "s|@PREFIX@|$PREFIX|g" "$SRC/systemd/edge-access.service" > /etc/systemd/system/edge-access.service
# The sandbox opened just wide enough for this config (an RTSP camera's address, a Jetson's GPU nodes); README.
install -d -m 755 /etc/systemd/system/edge-access.service.d
(cd "$PREFIX" && .venv/bin/python -m edge sandbox --config /etc/edge-access/config.yaml) \
  > /etc/systemd/system/edge-access.service.d/sandbox.conf
sed "s|@PREFIX@|$PREFIX|g" "$SRC/systemd/edge-access-web.service" > /etc/systemd/system/edge-access-web.service
systemctl daemon-reload
systemctl enable --now edge-access.service
echo "install: edge-access enabled; logs: journalctl -u edge-access -f" >&2
