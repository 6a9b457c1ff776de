"""Admin accounts, sessions, CSRF tokens and login rate limiting for the web page.

Passwords are stored only as argon2id hashes (argon2-cffi) in `web.admins_file` (mode 0600); there is no default
account: `python -m edge admin set-password NAME` creates one. Sessions live in the server's memory (a restart
logs everyone out) behind a random 256-bit cookie; each carries its own CSRF token for every form.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
import unicodedata
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from edge.errors import ConfigError, InputError

MIN_PASSWORD_CHARS = 10
MAX_ADMIN_NAME_CHARS = 32
TOKEN_BYTES = 32
_hasher = PasswordHasher()
# Verified when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def check_admin_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > MAX_ADMIN_NAME_CHARS or not all(
            c.isalnum() or c in "._-" for c in name) or any(unicodedata.category(c).startswith("C") for c in name):
        raise InputError(f"admin name {name!r}: use 1 to {MAX_ADMIN_NAME_CHARS} letters, digits, '.', '_' or '-'")
    return name


def read_admins(path: Path) -> dict[str, str]:
    """name → argon2 hash; {} when the file does not exist yet."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ConfigError(f"admins file {path} cannot be read ({err}); recreate it with `python -m edge admin "
                          "set-password NAME`") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"admins file {path} is not a name → hash mapping; recreate it with set-password")
    return data


def set_password(path: Path, name: str, password: str) -> None:
    """Create or change one admin's password (argon2id hash), written atomically with mode 0600."""
    name = check_admin_name(name)
    if len(password) < MIN_PASSWORD_CHARS:
        raise InputError(f"password too short: use at least {MIN_PASSWORD_CHARS} characters")
    path = Path(path)
    admins = read_admins(path)
    admins[name] = _hasher.hash(password)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(admins, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def verify_password(admins: dict[str, str], name: str, password: str) -> bool:
    stored = admins.get(name, _DUMMY_HASH)
    try:
        return _hasher.verify(stored, password) and name in admins
    except (VerificationError, InvalidHashError):
        return False


@dataclass
class Session:
    admin: str
    csrf: str
    expires_s: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) shown once on the next page


class Sessions:
    """Server-side sessions by random cookie token; expired ones are dropped as they are met."""

    def __init__(self, lifetime_s: float, clock=time.monotonic) -> None:
        self.lifetime_s = lifetime_s
        self.clock = clock
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(self, admin: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        session = Session(admin, secrets.token_urlsafe(TOKEN_BYTES), self.clock() + self.lifetime_s)
        with self._lock:
            self._by_token[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._by_token.get(token)
            if session is not None and session.expires_s < self.clock():
                del self._by_token[token]
                return None
            return session

    def end(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)


class LoginLimiter:
    """At most `attempts` failed logins per client address within `window_s`; then refuse until they age out."""

    def __init__(self, attempts: int, window_s: float, clock=time.monotonic) -> None:
        self.attempts, self.window_s, self.clock = attempts, window_s, clock
        self._failures: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, client: str) -> deque:
        failures = self._failures[client]
        while failures and failures[0] < self.clock() - self.window_s:
            failures.popleft()
        return failures

    def retry_after_s(self, client: str) -> float:
        """0 when this client may try; else seconds until its oldest failure leaves the window."""
        with self._lock:
            failures = self._recent(client)
            if len(failures) < self.attempts:
                return 0.0
            return max(failures[0] + self.window_s - self.clock(), 1.0)

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client).append(self.clock())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def tokens_match(expected: str, given: str | None) -> bool:
    return bool(given) and secrets.compare_digest(expected.encode(), given.encode())
