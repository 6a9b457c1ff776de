"""The systemd unit: notify + watchdog, restart, unprivileged user, sandboxing; verified by systemd-analyze where present."""
from __future__ import annotations

import configparser
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge.sdnotify import Notifier

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-access.service"


def unit_sections() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_has_the_directives_a_door_controller_needs():
    service = unit_sections()["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert service["User"] == "edge-access"
    assert set(service["SupplementaryGroups"].split()) == {"video", "gpio"}
    assert service["StateDirectory"] == "edge-access"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "true"
    assert "/var/lib/edge-access/" in service["ExecStart"]
    assert unit_sections()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    unit = tmp_path / "edge-access.service"
    unit.write_text(UNIT.read_text().replace("@PREFIX@", str(ROOT)).replace(f"{ROOT}/.venv/bin/python", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_notifier_sends_ready_and_rate_limited_watchdog(tmp_path):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(1)
        now = [100.0]
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"}, clock=lambda: now[0])
        notifier.ready()
        assert server.recv(256).startswith(b"READY=1")
        notifier.watchdog()
        notifier.watchdog()  # too soon: not sent
        now[0] += 1.5
        notifier.watchdog()
        assert [server.recv(256), server.recv(256)] == [b"WATCHDOG=1", b"WATCHDOG=1"]
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.recv(256)


def test_notifier_is_silent_outside_systemd():
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready()
    notifier.watchdog()
