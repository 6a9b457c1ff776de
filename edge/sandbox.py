"""The systemd drop-in that opens edge-access.service's sandbox just wide enough for what the config uses.

The unit itself allows no network at all (`PrivateNetwork`, `AF_UNIX` only, `IPAddressDeny=any`): a file, V4L2 or
CSI camera needs none. A network camera (`rtsp://`, `rtsps://`) needs IPv4/IPv6 sockets, the host's network and
its address in `IPAddressAllow`; systemd takes addresses, not names, so a name is resolved when the drop-in is
written (write it again when the address changes) and the DNS servers are allowed too, for the service's own
look-ups. The MQTT broker gets the same. On a Jetson, TensorRT and a CSI camera (nvargus-daemon, NVMM buffers) also
need NVIDIA's device nodes, and the CSI camera the daemon's socket. Every network service the config gains adds its
host in `network_hosts`.
`python -m edge sandbox --config …` prints it; install.sh writes it next to the unit.
"""
from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import urlsplit

from edge.config import Config
from edge.console import emit_json
from edge.errors import ConfigError

NETWORK_CAMERA_SCHEMES = ("rtsp", "rtsps")
# Device nodes of a Jetson's GPU, memory manager and video engines (JetPack 5 and 6 names), relative to /dev.
JETSON_NODES = ("nvmap", "nvhost-*", "nvgpu/*/*", "host1x-fence", "nvidia[0-9]*", "nvidiactl", "nvidia-modeset")
ARGUS_SOCKET = "/tmp/argus_socket"
HEADER = ("# Written by `python -m edge sandbox` from the config; regenerate it (sudo make install, or that command)\n"
          "# instead of editing. It widens the sandbox of edge-access.service only for what the config uses.\n")


def network_hosts(config: Config) -> list[tuple[str, str]]:
    """(what, host) for every network peer the config names: the camera when it streams over the network, the MQTT
    broker when MQTT is on."""
    hosts = []
    url = urlsplit(config.camera.source)
    if url.scheme.lower() in NETWORK_CAMERA_SCHEMES and url.hostname:
        hosts.append(("camera", url.hostname))
    if config.mqtt.enabled:
        # paho-mqtt wakes its network thread through a socket pair it builds over TCP on 127.0.0.1 (strace)
        hosts += [("MQTT broker", config.mqtt.host), ("paho-mqtt's wake-up socket pair", "127.0.0.1")]
    return hosts


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str) -> list[str]:
    """The host's addresses (a literal address is its own); a name that does not resolve is a config error."""
    if is_address(host):
        return [host]
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as err:
        raise ConfigError(f"{host} does not resolve ({err.strerror or err}): fix DNS or write the address itself "
                          "in the config, then run this again") from err
    return sorted({info[4][0].split("%")[0] for info in found})


def nameservers(resolv_conf: Path) -> list[str]:
    """The DNS servers glibc asks (127.0.0.1 when resolv.conf names none, as glibc does)."""
    lines = resolv_conf.read_text().splitlines() if resolv_conf.exists() else []
    servers = [line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1]
    return servers or ["127.0.0.1"]


def network_lines(config: Config, resolv_conf: Path) -> list[str]:
    hosts = network_hosts(config)
    if not hosts:
        return []
    lines, addresses = [], []
    for what, host in hosts:
        found = resolve(host)
        lines.append(f"# {what}: {host} → {' '.join(found)}")
        addresses += found
    if not all(is_address(host) for _, host in hosts):
        servers = nameservers(resolv_conf)
        lines.append(f"# DNS servers, to resolve names again at run time: {' '.join(servers)}")
        addresses += servers
    return lines + ["PrivateNetwork=false", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                    f"IPAddressAllow={' '.join(dict.fromkeys(addresses))}"]


def jetson_lines(config: Config, root: Path) -> tuple[list[str], list[str]]:
    """([Unit] lines, [Service] lines) for a Jetson's GPU (TensorRT) and CSI camera; none elsewhere."""
    if not (root / "etc" / "nv_tegra_release").exists():
        return [], []
    csi = config.camera.source.lower().startswith("csi://")
    if config.embedder.backend in ("onnxruntime", "opencv") and not csi:
        return [], []
    dev = root / "dev"
    nodes = sorted({path for pattern in JETSON_NODES for path in dev.glob(pattern) if not path.is_dir()})
    service = ["# NVIDIA GPU and video engine nodes found on this Jetson"]
    service += [f"DeviceAllow=/dev/{node.relative_to(dev)} rw" for node in nodes]
    if not csi:
        return [], service
    # The Argus client talks to nvargus-daemon over its socket in /tmp, which PrivateTmp hides: bind it in, and
    # restart with the daemon, whose restart replaces the socket.
    return (["After=nvargus-daemon.service", "PartOf=nvargus-daemon.service"],
            service + [f"BindPaths={ARGUS_SOCKET}"])


def dropin(config: Config, *, root: Path = Path("/")) -> str:
    """The drop-in's text (only the header when the config needs nothing beyond the unit)."""
    unit, service = jetson_lines(config, root)
    service = network_lines(config, root / "etc" / "resolv.conf") + service
    text = HEADER
    if unit:
        text += "[Unit]\n" + "".join(f"{line}\n" for line in unit)
    if service:
        text += "[Service]\n" + "".join(f"{line}\n" for line in service)
    return text


def cmd_sandbox(args, config: Config) -> int:
    """Print the drop-in for this config (--json: with the peers it opens the sandbox to)."""
    text = dropin(config)
    if args.json:
        emit_json({"hosts": [{"what": what, "host": host} for what, host in network_hosts(config)], "dropin": text})
    else:
        print(text, end="")
    return 0
