"""Append-only decision log in SQLite (one row per door decision) with optional face snapshots and retention."""
from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from edge.errors import InputError, StoreError, first_line
from edge.private import open_private, private_dir

log = logging.getLogger("edge.audit")

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
    snapshot TEXT,
    person_id TEXT,
    liveness TEXT,
    liveness_evidence TEXT
);
CREATE INDEX IF NOT EXISTS decisions_time ON decisions (t_unix);
CREATE TABLE IF NOT EXISTS admin_actions (
    id INTEGER PRIMARY KEY,
    t_unix REAL NOT NULL,
    admin TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT
);
"""
# Logs written before rows carried the person id or the liveness verdict gain those columns (NULL in their old
# rows) when opened.
ADDED_COLUMNS = {"person_id": "TEXT", "liveness": "TEXT", "liveness_evidence": "TEXT"}
PERSON_ID_INDEX = "CREATE INDEX IF NOT EXISTS decisions_person_id ON decisions (person_id)"
COLUMNS = ("id", "t_unix", "event", "person", "track", "frame", "distance_l2", "margin_l2", "votes", "door_action", "snapshot",
           "person_id", "liveness", "liveness_evidence")
JPEG_SUFFIX = ".jpg"


class AuditLog:
    """Opened lazily; `record` appends a row (and a snapshot JPEG when given), `prune` applies retention.

    Rows and snapshots are keyed by person id, never by name: snapshot files are named by time, event and id, and
    `forget_person(id)` erases a person whatever they were called when the row was written. The log, its folder and
    the snapshots are private (0600 files, 0700 folders) whatever the umask.
    """

    def __init__(self, path: Path, *, retention_days: float = 30.0, snapshot_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                private_dir(self.path.parent)
                open_private(self.path, "ab").close()  # private before SQLite writes a byte
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.executescript(SCHEMA)
                present = {row[1] for row in db.execute("PRAGMA table_info(decisions)")}
                for name, kind in ADDED_COLUMNS.items():
                    if name not in present:
                        db.execute(f"ALTER TABLE decisions ADD COLUMN {name} {kind}")
                db.execute(PERSON_ID_INDEX)
                self._db = db
            except (sqlite3.Error, OSError) as err:
                raise StoreError(f"audit log {self.path} cannot be opened: {err}") from None
        return self._db

    def record(self, decision, *, door_action: str, snapshot: np.ndarray | None = None, t_unix: float | None = None,
               person_id: str | None = None) -> int:
        """Append one decision (`person_id`: the store id of `decision.person`); returns its row id.

        A snapshot that cannot be written is logged and left out; the row is still written.
        """
        t_unix = time.time() if t_unix is None else t_unix
        snapshot_path = None
        if snapshot is not None and self.snapshot_dir is not None:
            try:
                snapshot_path = self._save_snapshot(snapshot, decision.event, person_id, t_unix)
            except (OSError, cv2.error) as err:
                log.warning("audit_snapshot_failed dir=%s error=%s", self.snapshot_dir, first_line(err))
        cursor = self._connect().execute(
            f"INSERT INTO decisions ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * (len(COLUMNS) - 1))})",
            (
                t_unix, decision.event, decision.person, decision.track, decision.frame,
                float(decision.distance_l2), float(decision.margin_l2), decision.votes, door_action, snapshot_path,
                person_id, decision.liveness.state, json.dumps(decision.liveness.evidence()),
            ),
        )
        return int(cursor.lastrowid)

    def _save_snapshot(self, image: np.ndarray, event: str, person_id: str | None, t_unix: float) -> str:
        """The chip as a private JPEG named by time, event and person id (never by name)."""
        ok, encoded = cv2.imencode(JPEG_SUFFIX, image)
        if not ok:
            raise OSError(f"cannot encode a {image.shape} image as JPEG")
        private_dir(self.snapshot_dir)
        stamp = datetime.fromtimestamp(t_unix, timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.snapshot_dir / f"{stamp}-{event}-{person_id or 'unknown'}{JPEG_SUFFIX}"
        with open_private(path, "wb") as file:
            file.write(encoded.tobytes())
        return str(path)

    def rows(self, since_unix: float = 0.0) -> list[dict]:
        """Decisions at or after since_unix, oldest first."""
        cursor = self._connect().execute(
            f"SELECT {', '.join(COLUMNS)} FROM decisions WHERE t_unix >= ? ORDER BY t_unix, id", (since_unix,)
        )
        return [dict(zip(COLUMNS, row)) for row in cursor]

    def page(self, *, person: str | None = None, event: str | None = None, since_unix: float = 0.0,
             until_unix: float | None = None, limit: int = 25, offset: int = 0) -> tuple[list[dict], int]:
        """One page of decisions, newest first, filtered by person name, event and time; and the total matching."""
        where, params = ["t_unix >= ?"], [since_unix]
        if until_unix is not None:
            where.append("t_unix < ?")
            params.append(until_unix)
        if person:
            where.append("person = ?")
            params.append(person)
        if event:
            where.append("event = ?")
            params.append(event)
        clause = " AND ".join(where)
        db = self._connect()
        total = db.execute(f"SELECT COUNT(*) FROM decisions WHERE {clause}", params).fetchone()[0]
        cursor = db.execute(f"SELECT {', '.join(COLUMNS)} FROM decisions WHERE {clause} ORDER BY t_unix DESC, id DESC"
                            " LIMIT ? OFFSET ?", (*params, limit, offset))
        return [dict(zip(COLUMNS, row)) for row in cursor], int(total)

    def snapshot_of(self, row_id: int) -> Path | None:
        """The snapshot file of one decision, None when it has none (or it was erased)."""
        row = self._connect().execute("SELECT snapshot FROM decisions WHERE id = ?", (row_id,)).fetchone()
        return Path(row[0]) if row and row[0] else None

    def record_admin(self, admin: str, action: str, detail: str = "", t_unix: float | None = None) -> int:
        """Append one admin action (who did what from the web page); details name person ids, never faces."""
        cursor = self._connect().execute(
            "INSERT INTO admin_actions (t_unix, admin, action, detail) VALUES (?, ?, ?, ?)",
            (time.time() if t_unix is None else t_unix, admin, action, detail),
        )
        return int(cursor.lastrowid)

    def admin_actions(self, limit: int = 50) -> list[dict]:
        """The latest admin actions, newest first."""
        cursor = self._connect().execute(
            "SELECT t_unix, admin, action, detail FROM admin_actions ORDER BY t_unix DESC, id DESC LIMIT ?", (limit,))
        return [dict(zip(("t_unix", "admin", "action", "detail"), row)) for row in cursor]

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

    def forget_person(self, person_id: str, legacy_name: str | None = None) -> int:
        """Right to be forgotten: delete the snapshots of every row of this person id and drop their name and id
        from the log (the event itself stays); returns rows touched. Rows written before rows carried ids have
        none: those under `legacy_name` (the person's name when removed) are erased too."""
        where = "person_id = ? OR (person_id IS NULL AND person = ?)"
        db = self._connect()
        rows = db.execute(f"SELECT id, snapshot FROM decisions WHERE {where}", (person_id, legacy_name)).fetchall()
        for _, snapshot in rows:
            if snapshot:
                Path(snapshot).unlink(missing_ok=True)
        db.execute(f"UPDATE decisions SET person = NULL, person_id = NULL, snapshot = NULL WHERE {where}",
                   (person_id, legacy_name))
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
