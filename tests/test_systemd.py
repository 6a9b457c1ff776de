"""The systemd unit: notify + watchdog, restart, unprivileged user, and its sandbox: `systemd-analyze verify` clean,
`security --offline=yes` ≤ 3.0, and the real door loop, recorded with strace, uses only the system calls, socket
families and device nodes the unit allows and never maps memory writable and executable."""
from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.sdnotify import Notifier

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-access.service"
VIDEO = ROOT / "samples" / "video" / "walk_toward_camera.mp4"
MAX_EXPOSURE = 3.0
BUTTON_FRAME = 40
RUN_TIMEOUT_S = 120
WATCHDOG_USEC = 300_000  # short, so that the traced run feeds the watchdog several times
POLL_S = 0.1
# DevicePolicy=closed always lets these through (systemd.resource-control(5)).
PSEUDO_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
CALL = re.compile(r"^\d+\s+([a-z0-9_]+)\((.*)$")
QUOTED_DEV = re.compile(r'"(/dev/[^"]+)"')


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


def service_directives(*texts: str) -> dict[str, list[str]]:
    """Every `Key=value` of [Service] in the unit (then in each drop-in's text), in order; a key given on several
    lines (SystemCallFilter, DeviceAllow) keeps all."""
    directives: dict[str, list[str]] = {}
    section = None
    for line in "\n".join((UNIT.read_text(), *texts)).splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            directives.setdefault(key, []).append(value)
    return directives


def tool(name: str) -> str:
    """A system tool the check needs (`make test` installs it with apt-get); skip, naming it, where it is absent."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {'systemd' if name.startswith('systemd') else name})")
    return path


def install_unit(folder: Path) -> Path:
    """The unit as install.sh writes it (@PREFIX@ filled in), with this checkout as the prefix and this interpreter."""
    unit = folder / "edge-access.service"
    unit.write_text(UNIT.read_text().replace("@PREFIX@", str(ROOT)).replace(f"{ROOT}/.venv/bin/python", sys.executable))
    return unit


@pytest.fixture
def installed_unit(tmp_path) -> Path:
    return install_unit(tmp_path)


def verify_output(unit: Path) -> tuple[int, str]:
    """`systemd-analyze verify` of a unit file (and the drop-ins in UNIT.d/ next to it): exit status, all output."""
    result = subprocess.run([tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def exposure(unit: Path) -> float:
    """The overall exposure `systemd-analyze security --offline=yes` gives a unit file (with its drop-ins)."""
    result = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    print(f"\n{unit.name}: exposure {found.group(1)}")
    return float(found.group(1))


def test_systemd_analyze_verify_is_clean(installed_unit):
    assert verify_output(installed_unit) == (0, "")


def test_systemd_analyze_security_rates_the_unit_at_most_3(installed_unit):
    assert exposure(installed_unit) <= MAX_EXPOSURE


# ---- the real door loop under strace -------------------------------------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: each @group with its members (system calls and nested @groups)."""
    listing = subprocess.run([tool("systemd-analyze"), "syscall-filter"], capture_output=True, text=True, check=True)
    groups: dict[str, list[str]] = {}
    members = None
    for line in listing.stdout.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif not line.strip():
            members = None
        elif members is not None and not line.lstrip().startswith("#"):
            members.append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    return set().union(*(expand(member, groups) for member in groups[name])) if name.startswith("@") else {name}


def allowed_syscalls(filters: list[str], groups: dict[str, list[str]]) -> set[str]:
    """The allow-list the unit's SystemCallFilter= lines build, in order: plain lines add, `~` lines take away."""
    allowed: set[str] = set()
    for value in filters:
        names = set().union(*(expand(name, groups) for name in value.removeprefix("~").split()))
        allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed


def traced_calls(log: Path) -> list[tuple[str, str]]:
    """(name, arguments) of each call in an `strace -f` log, from the exec of the interpreter on: what the
    `unshare` wrapper did before it is not the door's."""
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if f'execve("{sys.executable}"' in line)
    return [match.groups() for line in lines[start:] if (match := CALL.match(line))]


def device_allowed(path: str, allow: list[str]) -> bool:
    """Whether DevicePolicy=closed with these DeviceAllow= entries lets the service open `path`."""
    mode = os.stat(path)
    kind = "char" if stat.S_ISCHR(mode.st_mode) else "block" if stat.S_ISBLK(mode.st_mode) else None
    if kind is None or path in PSEUDO_DEVICES:
        return True
    group = device_group(kind, os.major(mode.st_rdev))
    specs = [entry.split()[0] for entry in allow]
    return path in specs or any(fnmatch.fnmatch(group, spec.removeprefix(f"{kind}-"))
                                for spec in specs if spec.startswith(f"{kind}-"))


def device_group(kind: str, major: int) -> str:
    """The driver name /proc/devices gives a major number (what DeviceAllow=char-NAME matches)."""
    heading = "Character devices:" if kind == "char" else "Block devices:"
    listing = Path("/proc/devices").read_text().split("\n\n")
    block = next(part for part in listing if part.strip().startswith(heading))
    return dict(line.split() for line in block.strip().splitlines()[1:]).get(str(major), "")


def traced_edge(log: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`python -m edge ARGS` under `strace -f` (log in `log`) as the service runs it: an unprivileged user (as root, a
    user namespace in which the process sees itself as nobody), ONNX Runtime's settings left to the code."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environment.pop("ORT_DISABLE_TELEMETRY", None)  # the door's own default is under test
    unprivileged = [tool("unshare"), "--user"] if os.geteuid() == 0 else []
    result = subprocess.run([tool("strace"), "-f", "-qq", "-o", str(log), *unprivileged, sys.executable, "-m", "edge",
                             *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if unprivileged and "unshare failed" in result.stderr:
        pytest.skip(f"cannot run the door loop as an unprivileged user here: {result.stderr.strip()}")
    return result


def socket_families(calls: list[tuple[str, str]]) -> set[str]:
    return {args.split(",")[0] for name, args in calls if name in ("socket", "socketpair")}


def receive_until(sock: socket.socket, done: threading.Event) -> list[str]:
    """The datagrams that arrive on `sock` until `done` is set."""
    messages = []
    while not done.is_set():
        try:
            messages.append(sock.recv(256).decode())
        except TimeoutError:
            continue
    return messages


@pytest.fixture(scope="module")
def door_trace(tmp_path_factory, models_dir) -> SimpleNamespace:
    """`python -m edge run` on the sample video as the service runs it, under `strace -f`: an unprivileged user
    (as root, a user namespace makes the process see itself as nobody), HOME in the state directory, sd_notify to
    a socket with a watchdog, the relay on gpiozero's mock pins, a button press that enrols the person who then
    unlocks the door (store write, audit row, relay pulse)."""
    state = tmp_path_factory.mktemp("state")
    log = state / "strace.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, ThreadPoolExecutor(1) as reader:
        notify.bind(str(state / "notify.sock"))
        notify.settimeout(POLL_S)
        done = threading.Event()
        notified = reader.submit(receive_until, notify, done)  # as systemd does: a full queue would block the loop
        env = {"HOME": str(state), "NOTIFY_SOCKET": str(state / "notify.sock"), "WATCHDOG_USEC": str(WATCHDOG_USEC),
               "GPIOZERO_PIN_FACTORY": "mock"}
        try:
            result = traced_edge(log, env, "run", "--source", str(VIDEO), "--store", str(state / "store.edgestore"),
                                 "--audit", str(state / "audit.sqlite"), "--events", str(state / "events.jsonl"),
                                 "--door", "gpio", "--press-button-at", str(BUTTON_FRAME))
        finally:
            done.set()
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    return SimpleNamespace(result=result, calls=traced_calls(log), events=events, notified=notified.result(),
                           home=state)


def test_traced_door_loop_enrols_unlocks_and_feeds_the_watchdog(door_trace):
    assert door_trace.result.returncode == 0, door_trace.result.stderr
    assert [e["door"] for e in door_trace.events if e["event"] == "unlock"] == ["pulse"]
    assert door_trace.notified[0].startswith("READY=1")
    assert door_trace.notified.count("WATCHDOG=1") >= 2
    # ONNX Runtime's telemetry is off (its database would be in ~/.cache; the same switch stops its upload)
    assert not (door_trace.home / ".cache").exists()


def test_every_system_call_of_the_door_loop_is_in_the_units_filter(door_trace):
    used = Counter(name for name, _ in door_trace.calls)
    allowed = allowed_syscalls(service_directives()["SystemCallFilter"], syscall_groups())
    print(f"\n{len(used)} system calls used, {len(allowed)} allowed:", dict(used.most_common()))
    assert {"openat", "mmap", "sendto", "fsync", "rename"} <= used.keys()  # models, notify, the store's write
    assert sorted(used.keys() - allowed) == []


def test_door_loop_opens_only_the_allowed_socket_families_and_devices(door_trace):
    directives = service_directives()
    families = socket_families(door_trace.calls)
    assert "AF_UNIX" in families  # sd_notify
    assert families <= set(" ".join(directives["RestrictAddressFamilies"]).split()), families
    devices = {path for name, args in door_trace.calls if name in ("open", "openat")
               for path in QUOTED_DEV.findall(args) if os.path.exists(path)}
    assert devices, "the loop opened no device node at all (not even /dev/urandom): is the log complete?"
    assert [path for path in sorted(devices) if not device_allowed(path, directives["DeviceAllow"])] == []


def test_door_loop_never_maps_memory_writable_and_executable(door_trace):
    """What MemoryDenyWriteExecute=true refuses: mmap with PROT_WRITE|PROT_EXEC, mprotect adding PROT_EXEC,
    shmat with SHM_EXEC."""
    refused = [(name, args) for name, args in door_trace.calls
               if (name in ("mmap", "mmap2") and "PROT_WRITE" in args and "PROT_EXEC" in args)
               or (name in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in args)
               or (name == "shmat" and "SHM_EXEC" in args)]
    assert service_directives()["MemoryDenyWriteExecute"] == ["true"]
    assert refused == []


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
