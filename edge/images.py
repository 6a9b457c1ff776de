"""Read any still a user may hand us (JPEG/PNG/BMP, grey, 16-bit, RGBA, EXIF-rotated) as an upright BGR uint8 array."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.errors import InputError


def load_image(path: Path | str) -> np.ndarray:
    """BGR uint8 HxWx3; OpenCV applies EXIF orientation and reduces 16-bit, grey and alpha images to 8-bit BGR."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        with open(path, "rb") as fh:
            first = fh.read(1)
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from None
    if not first:
        raise InputError(f"{path}: empty file")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise InputError(f"{path}: not a readable image (corrupt or unsupported format)")
    return image
