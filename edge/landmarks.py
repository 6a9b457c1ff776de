"""5-point face landmarks for a box: dlib's shape_predictor_5_face_landmarks cascade, evaluated in numpy.

The model is the .npz written by engines.sp_to_npz. Every tree of a cascade level is evaluated at once, for
all faces, and dlib's arithmetic is kept where it changes results: float32 shapes and transforms, integer
grey (c0 + c1 + c2) // 3, feature pixels rounded half up, 0 outside the image, boxes with inclusive
right/bottom edges, leaf increments added tree by tree. Landmarks then agree with dlib's to the pixel.
Points: 0/1 outer/inner corner of the eye on the image's right, 2/3 outer/inner corner of the eye on the
image's left, 4 base of the nose.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge.errors import InputError, ModelError

FORMAT_VERSION = 1
ARRAYS = ("initial_shape", "split_idx1", "split_idx2", "split_threshold", "leaf_values", "anchor_idx", "deltas")
MAX_SPLITS = 15  # depth-4 trees: the 15 split decisions of a tree pack into one 16-bit code
GREY_CHANNELS = (1, 3)

# SSD box → the box the predictor was trained on (dlib's HOG detector: square, lower and tighter on the face).
# Fitted by bench/fit_box_mapping.py on 101 SSD/HOG pairs of the same faces (IoU ≥ 0.3) in the development
# photos (pairs/, people/, stills/), as medians: centre x unchanged (fit: −0.003·w), centre y moved down
# by 0.073·h, side 0.909·√(w·h) (the least spread of w, h, √(w·h), (w+h)/2: 6 % median abs deviation).
SSD_DY_PER_H = 0.0733
SSD_SIDE_PER_SQRT_WH = 0.909


class Pixels(NamedTuple):
    """An image flattened for gathers: row y·width + x of `table` holds pixel (x, y)'s channels."""

    table: np.ndarray
    height: int
    width: int


def _leaf_table(n_splits: int) -> np.ndarray:
    """Leaf reached for every code whose bit i says 'split node i goes left' (nodes in breadth-first order)."""
    codes = np.arange(1 << n_splits)
    node = np.zeros_like(codes)
    while True:
        inner = node < n_splits
        if not inner.any():
            return (node - n_splits).astype(np.uint8)
        left = (codes >> np.where(inner, node, 0)) & 1
        node = np.where(inner, 2 * node + 2 - left, node)


def predictor_boxes(ssd_boxes: np.ndarray) -> np.ndarray:
    """(N, 4) SSD boxes (left, top, right, bottom) → square dlib-style boxes with inclusive right/bottom."""
    boxes = np.asarray(ssd_boxes, dtype=np.float64).reshape(-1, 4)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + SSD_DY_PER_H * height
    half = SSD_SIDE_PER_SQRT_WH * np.sqrt(width * height) / 2
    return np.round(np.stack([cx - half, cy - half, cx + half, cy + half], axis=1))


class LandmarkPredictor:
    """dlib's 5-point shape predictor; `predict(image, boxes)` → (N, 5, 2) float32 pixel coordinates."""

    def __init__(self, *, npz_path: Path) -> None:
        self.npz_path = Path(npz_path)
        model = self._load(self.npz_path)
        levels, trees, splits = model["split_idx1"].shape
        leaves = model["leaf_values"].shape[2]
        if splits > MAX_SPLITS or leaves != splits + 1:
            raise ModelError(f"{self.npz_path}: trees with {splits} splits are not supported (at most {MAX_SPLITS})")
        self.num_parts = model["initial_shape"].shape[0]
        self._levels, self._trees, self._splits = levels, trees, splits
        # Shapes are (N, 2P) float32 rows x0, y0, x1, y1, … in box-normalised units, as dlib keeps them.
        self._initial = model["initial_shape"].astype(np.float32).reshape(-1)
        # Similarity transform initial → current shape (Umeyama): in 2-D its scaled rotation is [[a, -b], [b, a]]
        # with a and b linear in the centred current shape, so precompute those weights.
        initial = model["initial_shape"].astype(np.float64)
        centred = initial - initial.mean(axis=0)
        variance = (centred**2).sum() / self.num_parts
        fx, fy = centred[:, 0], centred[:, 1]
        weights = np.stack([np.stack([fx, fy], 1).reshape(-1), np.stack([-fy, fx], 1).reshape(-1)], axis=1)
        self._similarity_weights = weights / (self.num_parts * variance)  # (2P, 2): centred shape → (a, b)
        self._idx1 = model["split_idx1"].reshape(levels, trees * splits).astype(np.intp)
        self._idx2 = model["split_idx2"].reshape(levels, trees * splits).astype(np.intp)
        self._threshold = model["split_threshold"].reshape(levels, trees * splits).astype(np.float32)
        self._leaf_values = model["leaf_values"].astype(np.float32).reshape(levels, trees * leaves, -1)
        self._tree_first_leaf = np.arange(trees, dtype=np.intp) * leaves
        anchor = model["anchor_idx"].astype(np.intp)
        self._anchor_x, self._anchor_y = 2 * anchor, 2 * anchor + 1  # columns of x and y in a shape row
        deltas = model["deltas"].astype(np.float32)
        self._delta_x, self._delta_y = deltas[..., 0], deltas[..., 1]  # (L, F) each
        self._code_weights = (1 << np.arange(splits)).astype(np.uint16)
        self._leaf_of_code = _leaf_table(splits)

    @staticmethod
    def _load(path: Path) -> dict[str, np.ndarray]:
        """The model arrays; a missing, foreign or outdated file is a ModelError naming the fix."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                version = int(npz["format_version"])
                if version != FORMAT_VERSION:
                    raise ModelError(f"{path}: landmark model format {version}, expected {FORMAT_VERSION}: "
                                     f"delete it and run `make models`")
                return {name: npz[name] for name in ARRAYS}
        except FileNotFoundError:
            raise ModelError(f"landmark model {path} not found: run `make models`") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{path} is not a landmark model ({err}): delete it and run `make models`") from None

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Landmarks (N, 5, 2) float32, unrounded, for boxes (N, 4) = (left, top, right, bottom) inclusive.

        image is H×W×3 uint8 in any channel order (grey is the channel mean) or H×W uint8 grey; a C-contiguous
        image is used in place, any other is copied once per call. Boxes are used as given: dlib's are integers.
        """
        rects = np.asarray(boxes, dtype=np.float64)
        if rects.size == 0:
            return np.zeros((0, self.num_parts, 2), np.float32)
        if rects.ndim != 2 or rects.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4) (left, top, right, bottom), got shape {rects.shape}")
        pixels = _as_pixels(image)
        # Box-normalised (u, v) → pixel (left + u·(right − left), top + v·(bottom − top)): right/bottom are
        # the last pixel inside the box, so u = 1 lands on it.
        left, top = rects[:, :1], rects[:, 1:2]
        width, height = rects[:, 2:3] - left, rects[:, 3:4] - top
        box = (left, top, width, height)
        shape = np.repeat(self._initial[None], len(rects), axis=0)
        for level in range(self._levels):
            shape = self._step(level, pixels, box, shape)
        points = shape.reshape(len(rects), self.num_parts, 2)
        return np.stack([points[..., 0] * width + left, points[..., 1] * height + top], axis=-1).astype(np.float32)

    def _step(self, level: int, pixels: Pixels, box: tuple, shape: np.ndarray) -> np.ndarray:
        """One cascade level: sample its feature pixels around the current shape, add every tree's leaf."""
        left, top, width, height = box
        m = self._similarity(shape)  # (N, 4) float32: m00, m01, m10, m11
        dx, dy = self._delta_x[level], self._delta_y[level]
        # dlib: tform · delta + anchor, in float32, each product and sum rounded as it goes.
        u = m[:, 0:1] * dx + m[:, 1:2] * dy + shape.take(self._anchor_x[level], axis=1)
        v = m[:, 2:3] * dx + m[:, 3:4] * dy + shape.take(self._anchor_y[level], axis=1)
        values = _grey_at(pixels, u * width + left, v * height + top)  # (N, F) float32
        goes_left = values.take(self._idx1[level], axis=1) - values.take(self._idx2[level], axis=1)
        goes_left = goes_left > self._threshold[level]
        codes = goes_left.reshape(len(shape), self._trees, self._splits).view(np.uint8) @ self._code_weights
        rows = self._leaf_of_code[codes] + self._tree_first_leaf  # (N, T) rows of the level's leaf table
        increments = self._leaf_values[level].take(rows, axis=0)  # (N, T, 2P)
        # dlib adds the leaves to the shape one tree at a time; numpy reduces a non-contiguous axis in order
        # too (no pairwise blocking), so fold the shape into the first tree's leaf and sum over trees.
        increments[:, 0] += shape
        return increments.sum(axis=1)

    def _similarity(self, shape: np.ndarray) -> np.ndarray:
        """The 2×2 part (m00, m01, m10, m11) of the least-squares similarity initial → shape, per face, float32."""
        current = shape.reshape(len(shape), self.num_parts, 2).astype(np.float64)
        current -= current.mean(axis=1, keepdims=True)
        a, b = (current.reshape(len(shape), -1) @ self._similarity_weights).T
        return np.stack([a, -b, b, a], axis=1).astype(np.float32)


def _as_pixels(image: np.ndarray) -> Pixels:
    """The image as a (H·W, C) uint8 table (C = 1 or 3) with its size; a view when the image is contiguous."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputError(f"image must be uint8, got {image.dtype}: convert it (e.g. 16-bit PNG → 8-bit) first")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in GREY_CHANNELS:
        raise InputError(f"image must be H×W×3 colour or H×W grey, got shape {image.shape}: drop any alpha channel")
    height, width, channels = image.shape
    return Pixels(np.ascontiguousarray(image).reshape(-1, channels), height, width)


def _grey_at(pixels: Pixels, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dlib's grey value at each (x, y): rounded half up, integer channel mean, 0 outside the image."""
    col = np.floor(x + 0.5).astype(np.intp)
    row = np.floor(y + 0.5).astype(np.intp)
    # As unsigned, a negative index is huge: one comparison per axis tests both ends.
    inside = (col.view(np.uintp) < pixels.width) & (row.view(np.uintp) < pixels.height)
    samples = pixels.table.take(np.where(inside, row * pixels.width + col, 0), axis=0)
    channels = samples.shape[-1]
    grey = samples[..., 0].astype(np.uint16)
    for channel in range(1, channels):
        grey += samples[..., channel]
    grey //= channels
    grey *= inside
    return grey.astype(np.float32)
