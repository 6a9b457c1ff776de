"""The door loop's window for the admin page: every `web.live_interval_s` the latest frame (JPEG, at most 960 px
wide) and a status document (fps, door state, faces with names) are replaced atomically in `web.live_dir` (mode
0600). The loop never waits on the page: it writes a file at most once per interval and forgets it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import cv2

log = logging.getLogger("edge.live")
FRAME_FILE = "frame.jpg"
STATUS_FILE = "status.json"
JPEG_QUALITY = 80
MAX_WIDTH_PX = 960  # frames are shrunk to this width first: a cheap encode for the loop, enough for a page


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file (0600) + rename: a reader sees the old file or the new one, never half of one."""
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temp, path)


class LiveWriter:
    def __init__(self, folder: Path, *, interval_s: float, clock=time.monotonic) -> None:
        self.folder = Path(folder)
        self.interval_s = interval_s
        self.clock = clock
        self._last_s = float("-inf")

    def update(self, frame, faces, matches, *, door_unlocked: bool, counts: dict, fps: float) -> None:
        """Called once per processed frame; writes when the interval has passed. A failure is logged, not raised."""
        now = self.clock()
        if now - self._last_s < self.interval_s:
            return
        self._last_s = now
        scale = min(1.0, MAX_WIDTH_PX / frame.image.shape[1])
        image = frame.image if scale == 1.0 else cv2.resize(frame.image, None, fx=scale, fy=scale,
                                                            interpolation=cv2.INTER_AREA)
        status = {
            "t_unix": time.time(), "frame": frame.index, "fps": round(fps, 1), "door": "unlocked" if door_unlocked else "locked",
            "width": int(image.shape[1]), "height": int(image.shape[0]), "events": dict(counts),
            "faces": [{"box": [round(float(v) * scale, 1) for v in f.face.box], "name": m.person if m else None,
                       "distance_l2": round(float(m.distance_l2), 3) if m else None} for f, m in zip(faces, matches)],
        }
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if ok:
                write_atomically(self.folder / FRAME_FILE, jpeg.tobytes())
            write_atomically(self.folder / STATUS_FILE, json.dumps(status).encode())
        except OSError as err:
            log.warning("event=live_write_failed folder=%s error=%s", self.folder, err)


def read_status(folder: Path) -> dict | None:
    """The latest status document, None when the loop has not written one."""
    try:
        return json.loads((Path(folder) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
