"""Append-only decision log in SQLite (one row per door decision) with optional face snapshots and retention."""
from __future__ import annotations

import os
import re
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from edge.errors import InputError, StoreError

SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    t_unix REAL NOT NULL,
    event TEXT NOT NULL,
    person TEXT,
    track INTEGER,
    frame INTEGER,
    distance_l2 REAL,
    margin_l2 REAL,
    votes INTEGER,
    door_action TEXT,
    snapshot TEXT
);
CREATE INDEX IF NOT EXISTS decisions_time ON decisions (t_unix);
"""
COLUMNS = ("id", "t_unix", "event", "person", "track", "frame", "distance_l2", "margin_l2", "votes", "door_action", "snapshot")


class AuditLog:
    """Opened lazily; `record` appends a row (and a snapshot JPEG when given), `prune` applies retention."""

    def __init__(self, path: Path, *, retention_days: float = 30.0, snapshot_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._db.executescript(SCHEMA)
                os.chmod(self.path, 0o600)
            except (sqlite3.Error, OSError) as err:
                raise StoreError(f"audit log {self.path} cannot be opened: {err}") from None
        return self._db

    def record(self, decision, *, door_action: str, snapshot: np.ndarray | None = None, t_unix: float | None = None) -> int:
        """Append one decision; returns its row id."""
        t_unix = time.time() if t_unix is None else t_unix
        snapshot_path = self._save_snapshot(snapshot, decision, t_unix) if snapshot is not None else None
        cursor = self._connect().execute(
            "INSERT INTO decisions (t_unix, event, person, track, frame, distance_l2, margin_l2, votes, door_action, snapshot)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                t_unix, decision.event, decision.person, decision.track, decision.frame,
                float(decision.distance_l2), float(decision.margin_l2), decision.votes, door_action, snapshot_path,
            ),
        )
        return int(cursor.lastrowid)

    def _save_snapshot(self, image: np.ndarray, decision, t_unix: float) -> str | None:
        if self.snapshot_dir is None:
            return None
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.fromtimestamp(t_unix, timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.snapshot_dir / f"{stamp}-{decision.event}-{decision.person or 'unknown'}.jpg"
        cv2.imwrite(str(path), image)
        os.chmod(path, 0o600)
        return str(path)

    def rows(self, since_unix: float = 0.0) -> list[dict]:
        """Decisions at or after since_unix, oldest first."""
        cursor = self._connect().execute(
            f"SELECT {', '.join(COLUMNS)} FROM decisions WHERE t_unix >= ? ORDER BY t_unix, id", (since_unix,)
        )
        return [dict(zip(COLUMNS, row)) for row in cursor]

    def prune(self, now_unix: float | None = None) -> int:
        """Delete rows (and their snapshots) older than the retention period; returns how many."""
        cutoff = (time.time() if now_unix is None else now_unix) - self.retention_days * 86400
        db = self._connect()
        old = db.execute("SELECT snapshot FROM decisions WHERE t_unix < ?", (cutoff,)).fetchall()
        for (snapshot,) in old:
            if snapshot:
                Path(snapshot).unlink(missing_ok=True)
        db.execute("DELETE FROM decisions WHERE t_unix < ?", (cutoff,))
        return len(old)

    def forget_person(self, name: str) -> int:
        """Right to be forgotten: delete a person's snapshots and their name from the log; returns rows touched."""
        db = self._connect()
        rows = db.execute("SELECT id, snapshot FROM decisions WHERE person = ?", (name,)).fetchall()
        for _, snapshot in rows:
            if snapshot:
                Path(snapshot).unlink(missing_ok=True)
        db.execute("UPDATE decisions SET person = NULL, snapshot = NULL WHERE person = ?", (name,))
        return len(rows)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def parse_since(text: str, now_unix: float | None = None) -> float:
    """'90s', '15m', '2h', '7d' (ago) or an ISO date/time → unix seconds; InputError otherwise."""
    now_unix = time.time() if now_unix is None else now_unix
    relative = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if relative:
        return now_unix - float(relative.group(1)) * SECONDS_PER_UNIT[relative.group(2)]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"--since {text!r}: use a duration like 15m, 2h, 7d or an ISO time like 2026-11-25T08:00") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.timestamp()
