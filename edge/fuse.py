"""Templates from several faces: a quality weight per face and the weighted, re-normalised mean of unit embeddings.

One rule serves enrolment (a person's rows), evaluation (`eval-templates`) and the door loop (a track's frames):
a small, blurred or side-on face counts less, and one below the floors counts not at all. The weight's shape was
chosen by measurement on LFW (README, Templates).
"""
from __future__ import annotations

from collections import deque

import numpy as np

# A face this wide (detector box, px) or wider counts fully; narrower ones by (width / FULL_WEIGHT_FACE_PX).
FULL_WEIGHT_FACE_PX = 80.0
# Sharpness (variance of the chip's Laplacian) at which a face counts half: s / (s + HALF_WEIGHT_SHARPNESS).
HALF_WEIGHT_SHARPNESS = 20.0
# Yaw ratio (edge.quality.yaw_ratio) at which a face stops counting; linear from 1 at frontal.
ZERO_WEIGHT_YAW = 0.5


def quality_weight(width_px, sharpness, yaw) -> np.ndarray:
    """Weight in [0, 1] per face from its width, sharpness and yaw (arrays or scalars, broadcast)."""
    size_term = np.clip(np.divide(width_px, FULL_WEIGHT_FACE_PX), 0.0, 1.0)
    sharp = np.maximum(sharpness, 0.0)
    sharp_term = sharp / (sharp + HALF_WEIGHT_SHARPNESS)
    pose_term = np.clip(1.0 - np.divide(yaw, ZERO_WEIGHT_YAW), 0.0, 1.0)
    return size_term * sharp_term * pose_term


def fused(embeddings: np.ndarray, weights=None) -> np.ndarray | None:
    """Unit vector along the (weighted) mean of unit embeddings (k, 128); None when every weight is 0."""
    rows = np.asarray(embeddings)
    w = np.ones(len(rows)) if weights is None else np.asarray(weights)
    total = (rows * w[:, None]).sum(axis=0)  # float64 whatever the rows' dtype: the weights are
    norm = float(np.linalg.norm(total))
    if not w.any() or norm == 0.0:
        return None
    return (total / norm).astype(np.float32)


class TrackTemplate:
    """A door track's fused embedding: the quality-weighted mean of its last `window_frames` faces.

    The decision is taken on this vector, not on the newest frame, so one lucky frame moves it by about
    1/frames of the way and cannot open the door on its own; frames of weight 0 (side-on) add nothing.
    """

    def __init__(self, window_frames: int) -> None:
        self._vectors: deque[np.ndarray] = deque(maxlen=window_frames)
        self._weights: deque[float] = deque(maxlen=window_frames)

    def add(self, embedding: np.ndarray, weight: float) -> None:
        self._vectors.append(embedding)
        self._weights.append(float(weight))

    @property
    def frames(self) -> int:
        """Frames in the window that count (weight > 0)."""
        return sum(w > 0 for w in self._weights)

    def vector(self) -> np.ndarray | None:
        """The fused unit embedding, None while no frame in the window counts."""
        return fused(np.stack(self._vectors), np.array(self._weights)) if self.frames else None


def face_weight(face) -> float:
    """quality_weight of an EmbeddedFace (detector box width, chip sharpness, landmark yaw; a face without
    landmarks is taken as frontal)."""
    from edge.quality import sharpness, yaw_ratio

    landmarks = face.face.landmarks
    yaw = 0.0 if landmarks is None else yaw_ratio(landmarks)
    return float(quality_weight(face.face.width_px, sharpness(face.chip), yaw))
