"""Face alignment: image + 5 landmarks → upright face chip, pixel-for-pixel what `dlib.get_face_chip` returns.

The recogniser was trained on dlib's chips, so this reproduces dlib's recipe rather than a plain warpAffine:
a similarity fit to a template gives angle and scale; large faces are first halved through a [1 4 6 4 1]
integer pyramid built over a margin around the face only; the chip is then sampled bilinearly in double
precision, truncated to uint8, black wherever a sample's 2×2 neighbourhood leaves the (cropped) image.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

# dlib's 5-point template (get_face_chip_details), in units of the unpadded face square; rows follow the
# predictor's order: outer/inner corner of the eye on the image's right, outer/inner of the other eye, nose base.
TEMPLATE_5PT = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
# pyramid_down<2>: a level-(k+1) pixel (x, y) covers level-k pixels 2x..2x+4; dlib maps rectangles down with
# p / 2 − offset (its offsets, x and y differ), which decides the level and the sampling grid.
_PYR_OFFSET = (1.25, 0.75)
_PYR_MIN_SIDE_PX = 9
_PYR_KERNEL = np.array([1, 4, 6, 4, 1], np.float32)
_PYR_DIVISOR = np.float32(1 / 256)
# extract_image_chips grows the crop by 2 px at full resolution, doubling (+2) per pyramid level.
_GROW_START_PX = 2.0


def chip_points(size_px: int = 150, padding: float = 0.25) -> np.ndarray:
    """Where the 5 landmarks land in a size_px chip, (5, 2) float64."""
    return (padding + TEMPLATE_5PT) / (2 * padding + 1) * size_px


def align_chip(image: np.ndarray, landmarks: np.ndarray, *, size_px: int = 150, padding: float = 0.25) -> np.ndarray:
    """The (size_px, size_px, 3) uint8 face chip for 5 landmarks (x, y pixels, dlib order), channels as in image.

    A grey HxW image gives the grey chip repeated in 3 channels (what dlib gives for the image converted to RGB).
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be HxWx3 or HxW uint8, got {image.shape} {image.dtype}")
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"landmarks must be (5, 2), got {points.shape}")
    if size_px < 2:
        raise ValueError(f"size_px must be at least 2, got {size_px}")
    # dlib's Python get_face_chip takes padding as a C float.
    padding = float(np.float32(padding))
    angle, scale, centre = _similarity(chip_points(size_px, padding), points, size_px / 2.0)
    half = (size_px * scale - 1) / 2
    rect = (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)
    chip = _extract(image, rect, angle, size_px)
    return chip if chip.ndim == 3 else np.repeat(chip[:, :, None], 3, axis=2)


def mirror_chip(chip: np.ndarray) -> np.ndarray:
    """The chip (H, W, C) or a batch of chips (N, H, W, C) flipped left-right (test-time augmentation)."""
    return np.ascontiguousarray(np.flip(chip, axis=-2))


def _similarity(src: np.ndarray, dst: np.ndarray, centre_src: float) -> tuple[float, float, tuple[float, float]]:
    """Least-squares similarity src → dst (Umeyama, in closed form for 2-D): angle, scale, image of (c, c)."""
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    sigma_src = float((src_c**2).sum(axis=1).mean())
    cov = dst_c.T @ src_c / len(src)
    # For 2-D, scale·rotation = [[a, −b], [b, a]] with a, b from the covariance's symmetric/antisymmetric parts.
    a = (cov[0, 0] + cov[1, 1]) / sigma_src
    b = (cov[1, 0] - cov[0, 1]) / sigma_src
    tx = dst_mean[0] - (a * src_mean[0] - b * src_mean[1])
    ty = dst_mean[1] - (b * src_mean[0] + a * src_mean[1])
    centre = ((a * centre_src - b * centre_src) + tx, (b * centre_src + a * centre_src) + ty)
    return math.atan2(b, a), math.sqrt(a * a + b * b), centre


def _rotated_corners(rect: tuple[float, float, float, float], angle: float) -> np.ndarray:
    """Corners tl, tr, bl, br of rect rotated by angle about its centre, (4, 2)."""
    left, top, right, bottom = rect
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    corners = []
    for x, y in ((left, top), (right, top), (left, bottom), (right, bottom)):
        dx, dy = x - cx, y - cy
        corners.append((cos_a * dx - sin_a * dy + cx, sin_a * dx + cos_a * dy + cy))
    return np.array(corners)


def _rect_down(rect: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    left, top, right, bottom = rect
    ox, oy = _PYR_OFFSET
    return (left / 2.0 - ox, top / 2.0 - oy, right / 2.0 - ox, bottom / 2.0 - oy)


def _area(rect: tuple[float, float, float, float]) -> float:
    left, top, right, bottom = rect
    if left > right or top > bottom:
        return 0.0
    return (right - left + 1) * (bottom - top + 1)


def _lround(value: float) -> int:
    """C's lround (half away from zero) for value ≥ 0."""
    floor = math.floor(value)
    return int(floor) + (value - floor >= 0.5)


def _extract(image: np.ndarray, rect: tuple[float, float, float, float], angle: float, size_px: int) -> np.ndarray:
    """dlib's extract_image_chip for one rotated rectangle: crop with margin, pyramid, bilinear sample."""
    height, width = image.shape[:2]
    out_area = size_px * size_px
    depth, grow = 0, _GROW_START_PX
    small = _rect_down(rect)
    while _area(small) > out_area:
        small = _rect_down(small)
        depth += 1
        grow = grow * 2 + 2

    corners = _rotated_corners(rect, angle)
    left = max(corners[:, 0].min() - grow, 0.0)
    top = max(corners[:, 1].min() - grow, 0.0)
    right = min(corners[:, 0].max() + grow, width - 1.0)
    bottom = min(corners[:, 1].max() + grow, height - 1.0)
    if left > right or top > bottom:
        return np.zeros((size_px, size_px) + image.shape[2:], np.uint8)
    box_left, box_top, box_right, box_bottom = (_lround(v) for v in (left, top, right, bottom))
    source = image[box_top : box_bottom + 1, box_left : box_right + 1]

    level_rect = (rect[0] - box_left, rect[1] - box_top, rect[2] - box_left, rect[3] - box_top)
    level = -1
    while _area(_rect_down(level_rect)) > out_area:
        level += 1
        level_rect = _rect_down(level_rect)
    for _ in range(level + 1):
        source = _pyramid_down(source)

    tl, tr, bl, _ = _rotated_corners(level_rect, angle)
    step = size_px - 1
    cols = np.arange(size_px, dtype=np.float64)
    rows = cols[:, None]
    xs = ((tr[0] - tl[0]) / step * cols + (bl[0] - tl[0]) / step * rows) + tl[0]
    ys = ((tr[1] - tl[1]) / step * cols + (bl[1] - tl[1]) / step * rows) + tl[1]
    return _sample_bilinear(source, xs, ys)


def _pyramid_down(image: np.ndarray) -> np.ndarray:
    """One level of dlib's pyramid_down<2>: separable [1 4 6 4 1] filter, every other pixel, integer sum / 256.

    Output pixel (y, x) sums input pixels 2y..2y+4 × 2x..2x+4 with no border handling, size (n − 3) // 2.
    OpenCV filters in float32, which is exact here (every partial sum is an integer ≤ 16 · 16 · 255 < 2^24).
    """
    height, width = image.shape[:2]
    if height < _PYR_MIN_SIDE_PX or width < _PYR_MIN_SIDE_PX:
        return np.zeros((0, 0) + image.shape[2:], np.uint8)
    out_h, out_w = (height - 3) // 2, (width - 3) // 2
    total = cv2.sepFilter2D(image, cv2.CV_32F, _PYR_KERNEL, _PYR_KERNEL, borderType=cv2.BORDER_REPLICATE)
    centres = total[2 : 2 + 2 * out_h : 2, 2 : 2 + 2 * out_w : 2]
    return (centres * _PYR_DIVISOR).astype(np.uint8)  # exact power-of-two scale, then truncation


def _sample_bilinear(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear samples at (xs, ys) in float64, truncated to uint8; 0 where the 2×2 neighbourhood is not inside."""
    height, width = image.shape[:2]
    if height < 2 or width < 2:
        return np.zeros(xs.shape + image.shape[2:], np.uint8)
    left, top = np.floor(xs), np.floor(ys)
    inside = (left >= 0) & (top >= 0) & (left + 1 < width) & (top + 1 < height)
    x0 = np.where(inside, left, 0).astype(np.intp)
    y0 = np.where(inside, top, 0).astype(np.intp)
    fx, fy = xs - left, ys - top
    if image.ndim == 3:
        fx, fy, inside = fx[..., None], fy[..., None], inside[..., None]
    # (1 − fy)·((1 − fx)·tl + fx·tr) + fy·((1 − fx)·bl + fx·br), the same float64 operations in the same order, in
    # place and with the four neighbours gathered by flat index (a third faster; identical bits, test_align).
    flat = image.reshape((height * width,) + image.shape[2:])
    at = y0 * width + x0
    upper = np.take(flat, at, axis=0) * (1 - fx)
    upper += np.take(flat, at + 1, axis=0) * fx
    at += width
    lower = np.take(flat, at, axis=0) * (1 - fx)
    lower += np.take(flat, at + 1, axis=0) * fx
    upper *= 1 - fy
    lower *= fy
    upper += lower
    np.clip(upper, 0, 255, out=upper)
    upper *= inside  # 0 where the 2×2 neighbourhood is not inside
    return upper.astype(np.uint8)
