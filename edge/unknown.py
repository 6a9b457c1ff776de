"""Unknown-face inbox: the best face of every track the door did not recognise, kept (only when `unknown.keep` is
on) as a 150×150 chip JPEG and its 128-D embedding, grouped by identity for the admin page, deleted after
`unknown.retention_days`.

Grouping is average-linkage agglomerative clustering of the L2 distances (scipy), cut at `unknown.group_l2`;
chosen by measurement on an identity-labelled set (`bench/cluster_unknown.py`, README "Unknown-face inbox").
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.errors import StoreError, first_line
from edge.quality import quality_problem, quality_score
from edge.types import EmbeddedFace, Frame

log = logging.getLogger("edge.unknown")

GROUPING_METHODS = ("average", "complete", "single")
SCHEMA = """
CREATE TABLE IF NOT EXISTS faces (
    id INTEGER PRIMARY KEY,
    t_unix REAL NOT NULL,
    track INTEGER,
    quality REAL NOT NULL,
    embedding BLOB NOT NULL,
    chip TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS faces_time ON faces (t_unix);
"""
EMBEDDING_DTYPE = np.dtype("<f4")
CHIP_JPEG_QUALITY = 90


def group_faces(embeddings: np.ndarray, threshold_l2: float, *, method: str = "average") -> np.ndarray:
    """Group label (0..k-1) per embedding row: hierarchical clustering of L2 distances cut at `threshold_l2`."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if method not in GROUPING_METHODS:
        raise ValueError(f"grouping method must be one of {GROUPING_METHODS}, got {method!r}")
    count = len(embeddings)
    if count < 2:
        return np.zeros(count, dtype=np.int64)
    tree = linkage(np.asarray(embeddings, dtype=np.float64), method=method, metric="euclidean")
    return fcluster(tree, t=threshold_l2, criterion="distance").astype(np.int64) - 1


@dataclass(frozen=True)
class UnknownFace:
    id: int
    t_unix: float
    track: int | None
    quality: float
    chip: Path
    embedding: np.ndarray


class UnknownInbox:
    """The kept faces: rows in `<folder>/unknown.sqlite`, chips in `<folder>/chips/<id>.jpg` (all mode 0600)."""

    def __init__(self, folder: Path, *, retention_days: float = 7.0) -> None:
        self.folder = Path(folder)
        self.retention_days = retention_days
        self._db: sqlite3.Connection | None = None

    @property
    def chip_dir(self) -> Path:
        return self.folder / "chips"

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.chip_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                path = self.folder / "unknown.sqlite"
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._db.executescript(SCHEMA)
                os.chmod(path, 0o600)
            except (sqlite3.Error, OSError) as err:
                raise StoreError(f"unknown-face inbox {self.folder} cannot be opened: {err}") from None
        return self._db

    def add(self, face: EmbeddedFace, *, track: int | None, t_unix: float | None = None) -> int:
        """Keep one face (chip + embedding); returns its id."""
        db = self._connect()
        embedding = np.asarray(face.embedding, dtype=EMBEDDING_DTYPE)
        cursor = db.execute(
            "INSERT INTO faces (t_unix, track, quality, embedding, chip) VALUES (?, ?, ?, ?, '')",
            (time.time() if t_unix is None else t_unix, track, float(quality_score(face)), embedding.tobytes()),
        )
        face_id = int(cursor.lastrowid)
        chip = self.chip_dir / f"{face_id}.jpg"
        ok, jpeg = cv2.imencode(".jpg", face.chip, [cv2.IMWRITE_JPEG_QUALITY, CHIP_JPEG_QUALITY])
        fd = os.open(chip, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(jpeg.tobytes())
        db.execute("UPDATE faces SET chip = ? WHERE id = ?", (chip.name, face_id))
        return face_id

    def faces(self, ids: list[int] | None = None) -> list[UnknownFace]:
        """Kept faces, oldest first (only `ids` when given)."""
        query = "SELECT id, t_unix, track, quality, embedding, chip FROM faces"
        params: tuple = ()
        if ids is not None:
            query += f" WHERE id IN ({', '.join('?' * len(ids))})"
            params = tuple(int(i) for i in ids)
        rows = self._connect().execute(query + " ORDER BY t_unix, id", params).fetchall()
        return [UnknownFace(r[0], r[1], r[2], r[3], self.chip_dir / r[5], np.frombuffer(r[4], EMBEDDING_DTYPE))
                for r in rows]

    def groups(self, threshold_l2: float) -> list[list[UnknownFace]]:
        """Kept faces grouped by identity, largest group first, best-quality face first within a group."""
        faces = self.faces()
        if not faces:
            return []
        labels = group_faces(np.stack([f.embedding for f in faces]), threshold_l2)
        grouped: dict[int, list[UnknownFace]] = {}
        for face, label in zip(faces, labels.tolist()):
            grouped.setdefault(label, []).append(face)
        members = [sorted(g, key=lambda f: -f.quality) for g in grouped.values()]
        return sorted(members, key=lambda g: (-len(g), -g[0].t_unix))

    def chip_path(self, face_id: int) -> Path | None:
        row = self._connect().execute("SELECT chip FROM faces WHERE id = ?", (int(face_id),)).fetchone()
        return self.chip_dir / row[0] if row else None

    def discard(self, ids: list[int]) -> int:
        """Delete faces and their chips from disk; returns how many were there."""
        faces = self.faces(ids)
        db = self._connect()
        for face in faces:
            face.chip.unlink(missing_ok=True)
            db.execute("DELETE FROM faces WHERE id = ?", (face.id,))
        return len(faces)

    def prune(self, now_unix: float | None = None) -> int:
        """Retention: delete faces (rows and chips) older than `retention_days`; returns how many."""
        cutoff = (time.time() if now_unix is None else now_unix) - self.retention_days * 86400
        old = [r[0] for r in self._connect().execute("SELECT id FROM faces WHERE t_unix < ?", (cutoff,))]
        return self.discard(old)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class UnknownCollector:
    """Kiosk side: per track, the best face that passes the enrolment gates while the track is unrecognised.
    When a track ends that was unknown in at least `min_frames` frames and never recognised, its best face goes
    to the inbox (so a passer-by seen once, or a known person's bad frames, are not kept)."""

    def __init__(self, inbox: UnknownInbox, enroll_config, *, min_frames: int) -> None:
        self.inbox = inbox
        self.enroll_config = enroll_config
        self.min_frames = min_frames
        self._best: dict[int, tuple[float, EmbeddedFace]] = {}
        self._unknown_frames: dict[int, int] = {}
        self._known: set[int] = set()

    def observe(self, frame: Frame, faces: list[EmbeddedFace], matches: list, tracks: dict) -> None:
        """After the decider's update: `tracks` (id → track with this frame's box) name each face's track."""
        track_of = {track.box: tid for tid, track in tracks.items() if track.last_frame == frame.index}
        for face, match in zip(faces, matches):
            tid = track_of.get(face.face.box)
            if tid is None or match is None:  # no track, or a track with no vote yet (fusion: side-on frames only)
                continue
            if match.person is not None:
                self._known.add(tid)
                self._best.pop(tid, None)
                continue
            self._unknown_frames[tid] = self._unknown_frames.get(tid, 0) + 1
            if tid not in self._known and quality_problem(face, self.enroll_config) is None:
                score = quality_score(face)
                if score > self._best.get(tid, (float("-inf"), None))[0]:
                    self._best[tid] = (score, face)
        for tid in [t for t in self._unknown_frames.keys() | self._known if t not in tracks]:
            self._finish(tid)

    def _finish(self, tid: int) -> None:
        best = self._best.pop(tid, None)
        unknown_frames = self._unknown_frames.pop(tid, 0)
        if best is not None and unknown_frames >= self.min_frames and tid not in self._known:
            try:
                face_id = self.inbox.add(best[1], track=tid)
                expired = self.inbox.prune()  # retention holds on a loop that runs for months, page opened or not
            except (StoreError, OSError, sqlite3.Error) as err:  # the inbox is a convenience: never stop the door
                log.warning("event=unknown_not_kept track=%d error=%s", tid, first_line(err))
            else:
                log.info("event=unknown_kept id=%d track=%d frames=%d expired=%d", face_id, tid, unknown_frames, expired)
        self._known.discard(tid)

    def flush(self) -> None:
        """End of the loop: keep what the still-open tracks have."""
        for tid in list(self._unknown_frames.keys() | self._known):
            self._finish(tid)
