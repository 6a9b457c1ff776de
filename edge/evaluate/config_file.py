"""Writing a calibrated threshold into config.yaml: one value changed in place, every other byte (comments) kept."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from edge.errors import InputError

# Thresholds written into config.yaml are rounded down to this many decimals: down keeps the FAR at or below target.
THRESHOLD_DECIMALS = 4

_SECTION = re.compile(r"^match:[ \t]*(#.*)?$")
_FLOW_SECTION = re.compile(r"^match:[ \t]*[^\s#]")
_KEY = re.compile(r"^(?P<indent>[ \t]+)(?P<key>[A-Za-z_][\w-]*):")
_THRESHOLD = re.compile(r"^(?P<head>[ \t]+threshold_l2:[ \t]*)(?P<value>[^\s#]+)(?P<gap>[ \t]*)(?P<tail>#.*)?$")


def set_threshold_in_yaml(text: str, threshold_l2: float) -> tuple[str, str | None]:
    """(new text, old value text or None): `match.threshold_l2` set to the value, every other byte unchanged.

    The value is replaced in place (a trailing comment keeps its column where it fits); a missing key is added as
    the first key under `match:`, a missing section at the end. Flow style (`match: {…}`) is refused.
    """
    value = repr(round(float(threshold_l2), THRESHOLD_DECIMALS))
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if text.endswith("\r\n") or "\r\n" in text[:200] else "\n"
    start = next((i for i, line in enumerate(lines) if _SECTION.match(line.rstrip("\r\n"))), None)
    if start is None:
        if any(_FLOW_SECTION.match(line) for line in lines):
            raise InputError("match: is written in flow style; set match.threshold_l2 by hand")
        separator = "" if not text or text.endswith("\n") else newline
        return f"{text}{separator}match:{newline}  threshold_l2: {value}{newline}", None
    end, indent = start + 1, None
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        key = _KEY.match(lines[end])
        indent = indent or (key.group("indent") if key else None)
        end += 1
    for i in range(start + 1, end):
        body = lines[i].rstrip("\r\n")
        found = _THRESHOLD.match(body)
        if found and _KEY.match(body).group("indent") == indent:
            old, tail = found.group("value"), found.group("tail") or ""
            gap = " " * max(1, len(found.group("gap")) + len(old) - len(value)) if tail else ""
            lines[i] = f"{found.group('head')}{value}{gap}{tail}{lines[i][len(body):]}"
            return "".join(lines), old
    lines.insert(start + 1, f"{indent or '  '}threshold_l2: {value}{newline}")
    return "".join(lines), None


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def write_threshold(path: Path, threshold_l2: float) -> str | None:
    """Set match.threshold_l2 in a config file: checked, backup FILE.bak first, then an atomic replace. Returns the old value."""
    import yaml

    from edge.config import load_config

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from None
    new_text, old = set_threshold_in_yaml(text, threshold_l2)
    written = ((yaml.safe_load(new_text) or {}).get("match") or {}).get("threshold_l2")
    if written != round(threshold_l2, THRESHOLD_DECIMALS):
        raise InputError(f"{path}: could not edit match.threshold_l2 safely; set it to {threshold_l2} by hand")
    shutil.copy2(path, backup_path(path))
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(new_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, path.stat().st_mode & 0o7777)
        load_config(temp)  # every other setting must still validate before the file is replaced
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return old
