"""Read any still a user may hand us (JPEG/PNG/BMP, grey, 16-bit, RGBA, EXIF-rotated) as an upright BGR uint8 array."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from edge.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The IEND chunk (zero length, fixed CRC) closes every complete PNG; without it libpng fails noisily on stderr.
PNG_IEND = b"IEND\xaeB`\x82"


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def photos_by_person(folder: Path) -> dict[str, list[Path]]:
    """folder/NAME/*.jpg → {NAME: sorted photos}; people without photos are left out; InputError when none."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected one sub-folder of photos per person)")
    people = {sub.name: sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
              for sub in sorted(folder.iterdir()) if sub.is_dir()}
    people = {name: photos for name, photos in people.items() if photos}
    if not people:
        raise InputError(f"{folder}: no sub-folders with photos (expected {folder}/NAME/photo.jpg)")
    return people


def load_image(path: Path | str) -> np.ndarray:
    """BGR uint8 HxWx3; OpenCV applies EXIF orientation and reduces 16-bit, grey and alpha images to 8-bit BGR."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from None
    if not data:
        raise InputError(f"{path}: empty file")
    image = None if data.startswith(PNG_SIGNATURE) and PNG_IEND not in data else decode_quietly(data)
    if image is None or image.size == 0:
        raise InputError(f"{path}: not a readable image (corrupt or unsupported format)")
    return image


def decode_quietly(data: bytes) -> np.ndarray | None:
    """cv2.imdecode with OpenCV's own error log muted: a bad file must give our one line, not a decoder dump.

    imdecode (unlike imread) also rejects a truncated JPEG instead of returning it padded with grey.
    """
    with opencv_quiet():
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


@contextmanager
def opencv_quiet() -> Iterator[None]:
    """OpenCV's own log muted inside the block: where we report a failure in one line, its dump is noise."""
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)
