"""Frozen records passed between stages (data flows one way: camera → detect → … → door)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Frame:
    """One camera image (BGR uint8) with its index in the stream and capture time in seconds."""

    image: np.ndarray
    index: int = 0
    t_s: float = 0.0


@dataclass(frozen=True)
class Face:
    """A detected face: box (left, top, right, bottom) in pixels, detector score, 5 landmarks (5,2) or None."""

    box: Box
    score: float
    landmarks: np.ndarray | None = None

    @property
    def width_px(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height_px(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area_px(self) -> float:
        return self.width_px * self.height_px


@dataclass(frozen=True)
class EmbeddedFace:
    """A face with its aligned chip (150×150 BGR) and unit-length 128-D embedding (both None for a face the door
    loop did not embed this frame: its track is decided)."""

    face: Face
    chip: np.ndarray | None
    embedding: np.ndarray | None


@dataclass(frozen=True)
class Match:
    """1:N answer for one embedding: best person (None when unknown), its distance and the margin to the next."""

    person: str | None
    distance_l2: float
    margin_l2: float
    candidate: str | None = None
    extra: dict = field(default_factory=dict)
