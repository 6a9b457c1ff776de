"""A throwaway Mosquitto for the MQTT tests: the real broker binary on a free localhost port with its own config
(anonymous, or a password file made by mosquitto_passwd plus an ACL), which a test can kill and restart."""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import wait_until

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
START_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def require_mosquitto(*, passwd: bool = False) -> None:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (`apt-get install mosquitto`; `make test` does it where it can)")
    if passwd and MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto_passwd is not installed (Debian package mosquitto)")


class Mosquitto:
    """One broker process; `users` {name: password} turns anonymous access off, `acl` is the ACL file's text."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None, acl: str | None = None,
                 persistence: bool = False, tls: tuple[Path, Path, Path] | None = None) -> None:
        require_mosquitto(passwd=bool(users))
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        lines = [f"listener {self.port} 127.0.0.1", f"user {getpass.getuser()}",
                 f"allow_anonymous {'false' if users else 'true'}", f"log_dest file {self.dir / 'broker.log'}"]
        if tls:
            lines += [f"cafile {tls[0]}", f"certfile {tls[1]}", f"keyfile {tls[2]}"]
        if users:
            passwords = self.dir / "passwords"
            for i, (name, password) in enumerate(users.items()):
                subprocess.run([MOSQUITTO_PASSWD, "-b", *(["-c"] if i == 0 else []), str(passwords), name, password],
                               check=True, capture_output=True)
            lines.append(f"password_file {passwords}")
        if acl is not None:
            (self.dir / "acl").write_text(acl)
            lines.append(f"acl_file {self.dir / 'acl'}")
        if persistence:  # saved only on a clean stop (SIGTERM): a killed broker comes back as of that save
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 86400"]
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        if not wait_until(lambda: accepts(self.port) or self.process.poll() is not None, START_S) \
                or self.process.poll() is not None:
            raise RuntimeError(f"mosquitto did not start: {self.process.stderr.read().decode()[-500:]}")
        return self

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye, as in a power cut."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=START_S)
        self.process = None


def make_tls_files(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = folder / f"{name}-ca.pem", folder / f"{name}-server.pem", folder / f"{name}-server.key"
    paths[0].write_bytes(certificate(f"{name} CA", ca_key, f"{name} CA", ca_key, ca=True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(certificate("127.0.0.1", server_key, f"{name} CA", ca_key, ca=False)
                         .public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths
