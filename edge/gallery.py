"""One face thumbnail per enrolled person (the aligned 150×150 chip, JPEG, mode 0600) in `<store>.faces/`, for the
admin page. Written when a person is enrolled through the page; erased with the person (CLI or page)."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

JPEG_QUALITY = 90


def thumbnail_path(store_path: Path, person_id: str) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".faces") / f"{person_id}.jpg"


def save_thumbnail(store_path: Path, person_id: str, chip: np.ndarray) -> None:
    """Keep the chip as the person's thumbnail unless they already have one."""
    path = thumbnail_path(store_path, person_id)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ok, jpeg = cv2.imencode(".jpg", chip, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if ok:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
            file.write(jpeg.tobytes())


def forget_thumbnail(store_path: Path, person_id: str) -> None:
    thumbnail_path(store_path, person_id).unlink(missing_ok=True)
