"""Read any still a user may hand us (JPEG/PNG/BMP, grey, 16-bit, RGBA, EXIF-rotated) as an upright BGR uint8 array."""
from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from edge.errors import InputError
from edge.quiet import stderr_muted

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The IEND chunk (zero length, fixed CRC) closes every complete PNG; without it libpng fails noisily on stderr.
PNG_IEND = b"IEND\xaeB`\x82"


# A 4 GB Raspberry Pi decodes a 50-megapixel photo (150 MB as BGR, a few copies while it is searched for faces)
# next to a running door loop; phone cameras write 12 to 50. Larger photos are refused before decoding.
DEFAULT_MAX_MEGAPIXELS = 50.0
MEGA = 1_000_000
# No supported format needs more file bytes per pixel than an uncompressed 32-bit float RGBA TIFF (16), plus
# metadata (EXIF, ICC profiles); a longer file is not the image its header describes.
MAX_FILE_BYTES_PER_PIXEL = 16
MAX_FILE_OVERHEAD_BYTES = 16 * MEGA

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


def load_image(path: Path | str, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """BGR uint8 HxWx3; OpenCV applies EXIF orientation and reduces 16-bit, grey and alpha images to 8-bit BGR.

    The size the header declares is checked before a byte is decoded: above `max_megapixels` (config
    `images.max_megapixels`) the photo is refused, so a small file claiming a huge image cannot exhaust memory.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        with open(path, "rb") as file:
            width, height = checked_size(file, path, max_megapixels)
            most_bytes = width * height * MAX_FILE_BYTES_PER_PIXEL + MAX_FILE_OVERHEAD_BYTES
            file.seek(0)
            data = file.read(most_bytes + 1)
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror or err})") from None
    if len(data) > most_bytes:
        raise InputError(f"{path}: more than {most_bytes} bytes for a {width}x{height} image: not a photo we can use")
    image = None if data.startswith(PNG_SIGNATURE) and PNG_IEND not in data else decode_quietly(data)
    if image is None or image.size == 0:
        raise InputError(f"{path}: not a readable image (corrupt or unsupported format)")
    return image


def checked_size(file: BinaryIO, path: Path, max_megapixels: float) -> tuple[int, int]:
    """(width, height) from the image header, read without decoding a pixel (Pillow reads headers lazily);
    InputError when there is no readable header or the image is above `max_megapixels`."""
    from PIL import Image

    too_large = (f"above the limit of {max_megapixels:g} megapixels (images.max_megapixels in the config): "
                 "scale the photo down")
    try:
        with warnings.catch_warnings(), stderr_muted():
            warnings.simplefilter("ignore")  # Pillow's own warnings about large or odd files: we decide below
            with Image.open(file) as image:
                width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own cap (about 179 megapixels) is far above ours
        raise InputError(f"{path}: its header declares over {2 * Image.MAX_IMAGE_PIXELS / MEGA:.0f} megapixels, "
                         f"{too_large}") from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error):
        if file.seek(0, io.SEEK_END) == 0:
            raise InputError(f"{path}: empty file") from None
        raise InputError(f"{path}: not a readable image (corrupt or unsupported format)") from None
    if width < 1 or height < 1:
        raise InputError(f"{path}: not a readable image (its header declares {width}x{height} pixels)")
    if width * height > max_megapixels * MEGA:
        raise InputError(f"{path}: {width}x{height} pixels is {too_large}")
    return width, height


def decode_quietly(data: bytes) -> np.ndarray | None:
    """cv2.imdecode with OpenCV's log and the C decoders' stderr muted: a bad file must give our one line, not a
    libjpeg/libpng dump.

    imdecode (unlike imread) also rejects a truncated JPEG instead of returning it padded with grey. None when
    the bytes are not an image OpenCV can decode.
    """
    with opencv_quiet(), stderr_muted():
        try:
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:  # OpenCV's own checks (e.g. a side above 2^20 pixels) on a header it cannot use
            return None


@contextmanager
def opencv_quiet() -> Iterator[None]:
    """OpenCV's own log muted inside the block: where we report a failure in one line, its dump is noise."""
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)
