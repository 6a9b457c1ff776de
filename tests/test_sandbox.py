"""The drop-in `python -m edge sandbox` derives from the config: nothing for a local camera; for an RTSP camera or
an MQTT broker its addresses (and the DNS servers when it is named), IPv4/IPv6 and the host's network; on a Jetson
the NVIDIA nodes and the Argus socket. The widened unit still verifies clean and stays ≤ 3.0, and the door loop
opening an RTSP camera or publishing to MQTT uses only what the drop-in adds (strace)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import cli
from test_systemd import (MAX_EXPOSURE, allowed_syscalls, exposure, install_unit, service_directives, socket_families,
                          syscall_groups, traced_calls, traced_edge, verify_output)

from edge.config import CameraConfig, Config, EmbedderConfig, MqttConfig, load_config
from edge.errors import ConfigError
from edge.sandbox import HEADER, dropin, network_hosts

RTSP_CAMERA = "rtsp://admin:secret@192.168.1.64:554/stream1"
PHOTOS = Path(__file__).resolve().parents[1] / "samples" / "photos"
INET_ADDRESS = re.compile(r'inet_addr\("([^"]+)"')


def config_for(source: str, backend: str = "auto") -> Config:
    return Config(camera=CameraConfig(source=source), embedder=EmbedderConfig(backend=backend))


def service_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith(("#", "["))]


@pytest.fixture
def host_root(tmp_path):
    """A host with a resolv.conf naming one DNS server (not a Jetson)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "resolv.conf").write_text("# comment\nsearch lan\nnameserver 192.168.1.1\n")
    return tmp_path


@pytest.mark.parametrize("source", ["v4l2:///dev/video0", "csi://0", "file://door.mp4", "images://frames"])
def test_a_local_camera_needs_nothing_beyond_the_unit(source, host_root):
    assert network_hosts(config_for(source)) == []
    assert dropin(config_for(source), root=host_root) == HEADER


def test_an_rtsp_camera_by_address_gets_exactly_that_address(host_root):
    text = dropin(config_for(RTSP_CAMERA), root=host_root)
    assert service_lines(text) == ["PrivateNetwork=false", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                                   "IPAddressAllow=192.168.1.64"]
    assert "secret" not in text and "admin" not in text  # credentials never leave the config


def test_an_rtsp_camera_by_name_is_resolved_and_the_dns_servers_allowed(host_root):
    allow = [line for line in service_lines(dropin(config_for("rtsp://localhost:8554/door"), root=host_root))
             if line.startswith("IPAddressAllow=")]
    assert allow and "127.0.0.1" in allow[0].split("=")[1].split() and allow[0].endswith(" 192.168.1.1")


def test_mqtt_gets_its_broker_and_the_loopback_paho_wakes_itself_through(host_root):
    config = Config(mqtt=MqttConfig(enabled=True, host="192.168.1.10"))
    assert service_lines(dropin(config, root=host_root)) == ["PrivateNetwork=false",
                                                            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                                                            "IPAddressAllow=192.168.1.10 127.0.0.1"]


def test_a_camera_name_that_does_not_resolve_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("camera:\n  source: rtsp://door-camera.invalid/stream\n")
    with pytest.raises(ConfigError, match="door-camera.invalid does not resolve"):
        dropin(config_for("rtsp://door-camera.invalid/stream"))
    result = cli("sandbox", "--config", config)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "door-camera.invalid does not resolve" in result.stderr


def test_on_a_jetson_the_gpu_nodes_and_for_csi_the_argus_socket(host_root):
    (host_root / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    for node in ("nvmap", "nvhost-ctrl-gpu", "nvgpu/igpu0/ctrl", "video0", "sda"):
        (host_root / "dev" / node).parent.mkdir(parents=True, exist_ok=True)
        (host_root / "dev" / node).write_text("")
    gpu = ["DeviceAllow=/dev/nvgpu/igpu0/ctrl rw", "DeviceAllow=/dev/nvhost-ctrl-gpu rw", "DeviceAllow=/dev/nvmap rw"]
    assert service_lines(dropin(config_for("v4l2:///dev/video0", "tensorrt"), root=host_root)) == gpu
    assert service_lines(dropin(config_for("v4l2:///dev/video0", "onnxruntime"), root=host_root)) == []
    csi = dropin(config_for("csi://0", "onnxruntime"), root=host_root)
    assert service_lines(csi) == ["After=nvargus-daemon.service", "PartOf=nvargus-daemon.service", *gpu,
                                  "BindPaths=/tmp/argus_socket"]


def widened_unit(folder: Path, source: str) -> Path:
    """The installed unit and the drop-in `python -m edge sandbox` writes for this camera, laid out as install.sh
    lays them out."""
    unit = install_unit(folder)
    (folder / "edge-access.service.d").mkdir()
    (folder / "edge-access.service.d" / "sandbox.conf").write_text(dropin(config_for(source)))
    return unit


def test_the_unit_widened_for_an_rtsp_camera_verifies_clean_and_stays_at_most_3(tmp_path):
    unit = widened_unit(tmp_path, RTSP_CAMERA)
    assert verify_output(unit) == (0, "")
    assert exposure(unit) <= MAX_EXPOSURE


def assert_inside_the_widened_unit(log: Path, text: str) -> None:
    """The system calls, socket families and IPv4 peers in an strace log are inside the unit plus drop-in `text`."""
    calls = traced_calls(log)
    directives = service_directives(text)
    assert "AF_INET" in socket_families(calls)
    assert socket_families(calls) <= set(" ".join(directives["RestrictAddressFamilies"]).split())
    connected = {address for name, args in calls if name == "connect" for address in INET_ADDRESS.findall(args)}
    assert connected and connected <= set(" ".join(directives["IPAddressAllow"]).split()), connected
    assert {name for name, _ in calls} - allowed_syscalls(directives["SystemCallFilter"], syscall_groups()) == set()


def test_the_door_loop_opening_an_rtsp_camera_stays_inside_the_widened_unit(tmp_path):
    """The real loop trying an RTSP camera (port 1: refused at once) under strace."""
    source = "rtsp://127.0.0.1:1/door"
    log = tmp_path / "strace.log"
    result = traced_edge(log, {"HOME": str(tmp_path)}, "run", "--source", source, "--door", "simulated",
                         "--store", str(tmp_path / "store.edgestore"), "--audit", str(tmp_path / "audit.sqlite"))
    assert result.returncode == 2 and f"stream {source} cannot be opened" in result.stderr, result.stderr
    assert_inside_the_widened_unit(log, dropin(config_for(source)))


def test_the_door_loop_publishing_to_mqtt_stays_inside_the_widened_unit(tmp_path):
    """The real loop on the sample photos with MQTT on, talking to the broker on this machine, under strace."""
    config = tmp_path / "config.yaml"
    config.write_text(f"mqtt:\n  enabled: true\n  host: 127.0.0.1\n  client_id: sandbox-{tmp_path.name}\n")
    log = tmp_path / "strace.log"
    result = traced_edge(log, {"HOME": str(tmp_path)}, "run", "--config", str(config), "--source",
                         f"images://{PHOTOS}", "--door", "simulated", "--store", str(tmp_path / "store.edgestore"),
                         "--audit", str(tmp_path / "audit.sqlite"))
    assert result.returncode == 0 and "event=mqtt_connected broker=127.0.0.1:1883" in result.stderr, result.stderr
    assert_inside_the_widened_unit(log, dropin(load_config(config)))
