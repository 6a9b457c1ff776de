"""The blink cue of liveness: eye openness over a track from FaceMesh's dense landmarks, and blinks found in it.

FaceMesh (MediaPipe's `face_landmark` model, converted to ONNX by engines.tflite_to_onnx) takes a 192×192 RGB crop,
values in [0, 1], of a square region around the face turned so the eyes are level, and returns 468 points (x, y, z
in crop pixels) and a face-presence logit. The region comes from the 5-point landmarks the pipeline already has
(eye centres and nose base): FaceMesh was trained on regions MediaPipe derives from its own landmarks, and
ROI_CENTRE_DOWN / ROI_SIDE_PER_EYES place ours where that derivation settles (bench/fit_facemesh_roi.py: medians
over 105 faces of the development photos, spread ±0.05 and ±0.14 inter-eye distances).

Per eye the openness is the eye aspect ratio: the mean of two lid-to-lid distances over the corner-to-corner
distance; a frame's openness is the mean over both eyes. A blink is a dip of the openness below `blink_closed_ratio`
of the track's open-eye baseline (the median openness of the frames before the dip) that comes back above
`blink_open_ratio` of it within `blink_max_s`: a photo's eyes never close, and slow changes (a head tilting, the
face turning away) do not come back within a blink's time. A blink within the last `blink_window_s` makes the cue
pass; without one it stays pending (an open-eyed stare is no proof of a photo).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge.config import LivenessConfig
from edge.errors import ModelError

MODEL_FILE = "face_landmark.onnx"
INPUT_PX = 192
POINTS = 468
# FaceMesh topology, per eye: the two corners, then two (upper lid, lower lid) pairs.
EYES = (((33, 133), ((160, 144), (158, 153))), ((263, 362), ((385, 380), (387, 373))))
# 5-point landmarks (edge.landmarks order): corners of the eye on the image's right, then of the other, nose base.
RIGHT_EYE_POINTS, LEFT_EYE_POINTS, NOSE_POINT = (0, 1), (2, 3), 4
ROI_CENTRE_DOWN = 0.46  # crop centre below the eye midpoint, in inter-eye distances (along the face's vertical)
ROI_SIDE_PER_EYES = 3.97  # crop side, in inter-eye distances
MIN_FACE_LOGIT = 0.0  # FaceMesh's face-presence logit below this: no face in the crop, the frame is skipped
MIN_BASELINE_FRAMES = 3  # open-eye frames needed before a dip can be judged


@dataclass(frozen=True)
class Region:
    """A square crop of the frame: centre (x, y) pixels, side pixels, angle radians (eye line from image left)."""

    centre: tuple[float, float]
    side_px: float
    angle_rad: float

    def to_crop(self) -> np.ndarray:
        """2×3 affine matrix from frame pixels to crop pixels."""
        cos, sin = np.cos(self.angle_rad), np.sin(self.angle_rad)
        scale = INPUT_PX / self.side_px
        rotate = np.array([[cos, sin], [-sin, cos]]) * scale
        offset = np.array([INPUT_PX / 2, INPUT_PX / 2]) - rotate @ np.asarray(self.centre)
        return np.hstack([rotate, offset[:, None]])


def region_from_landmarks(points5: np.ndarray) -> Region:
    """The FaceMesh crop for a face's 5-point landmarks: eyes level, centred below the eyes."""
    right = points5[list(RIGHT_EYE_POINTS)].mean(axis=0)
    left = points5[list(LEFT_EYE_POINTS)].mean(axis=0)
    across = right - left
    eyes_px = float(np.hypot(*across))
    down = np.array([-across[1], across[0]]) / max(eyes_px, 1e-6)  # the face's vertical, image y grows down
    centre = (left + right) / 2 + ROI_CENTRE_DOWN * eyes_px * down
    return Region((float(centre[0]), float(centre[1])), ROI_SIDE_PER_EYES * max(eyes_px, 1.0),
                  float(np.arctan2(across[1], across[0])))


def eye_openness(points: np.ndarray) -> float:
    """Mean eye aspect ratio of both eyes from FaceMesh points (N, ≥2): lid distances over corner distance."""
    ratios = []
    for (outer, inner), lids in EYES:
        width = np.linalg.norm(points[outer, :2] - points[inner, :2])
        height = np.mean([np.linalg.norm(points[upper, :2] - points[lower, :2]) for upper, lower in lids])
        ratios.append(height / max(width, 1e-6))
    return float(np.mean(ratios))


class FaceMesh:
    """FaceMesh through ONNX Runtime: `infer(image_bgr, region)` → (points (468, 3) in crop pixels, face logit)."""

    def __init__(self, *, onnx_path: Path, threads: int = 1) -> None:
        if not Path(onnx_path).is_file():
            raise ModelError(f"{onnx_path} not found: run `make models` (the blink cue needs FaceMesh)")
        from edge.backends.onnxruntime import cpu_session

        self._session = cpu_session(onnx_path, threads)
        self._input = self._session.get_inputs()[0].name

    def crop(self, image_bgr: np.ndarray, region: Region) -> np.ndarray:
        """The model's input for a region: (1, 192, 192, 3) float32 RGB in [0, 1]."""
        patch = cv2.warpAffine(image_bgr, region.to_crop(), (INPUT_PX, INPUT_PX), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT)
        return (cv2.cvtColor(patch, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0)[None]

    def infer(self, image_bgr: np.ndarray, region: Region) -> tuple[np.ndarray, float]:
        points, logit = self._session.run(None, {self._input: self.crop(image_bgr, region)})
        return points.reshape(POINTS, 3), float(logit.ravel()[0])


@dataclass(frozen=True)
class BlinkEvidence:
    """`blinks` seen in the window, this frame's `openness` and its ratio to the open-eye baseline."""

    blinks: int = 0
    openness: float = 0.0
    ratio: float = 1.0


@dataclass
class BlinkTrack:
    """One track's openness samples (t_s, openness) and the times its blinks ended."""

    samples: deque = field(default_factory=deque)
    blink_ends_s: deque = field(default_factory=deque)
    dip_start_s: float | None = None  # when the openness fell below the closed ratio, while it is still down
    dip_baseline: float = 0.0
    shut: bool = False  # closed longer than a blink: no new dip starts until the eyes are open again


def add_sample(track: BlinkTrack, t_s: float, openness: float, s: LivenessConfig) -> BlinkEvidence:
    """Feed one frame's openness to a track's blink detector; pure logic (no model), the evidence now."""
    while track.samples and track.samples[0][0] < t_s - s.blink_window_s:
        track.samples.popleft()
    while track.blink_ends_s and track.blink_ends_s[0] < t_s - s.blink_window_s:
        track.blink_ends_s.popleft()
    baseline = float(np.median([v for _, v in track.samples])) if len(track.samples) >= MIN_BASELINE_FRAMES else None
    if track.dip_start_s is not None and t_s - track.dip_start_s > s.blink_max_s:
        track.dip_start_s, track.shut = None, True  # closed too long: eyes shut or looking down, not a blink
    if track.dip_start_s is not None:
        if openness >= s.blink_open_ratio * track.dip_baseline:
            track.blink_ends_s.append(t_s)
            track.dip_start_s = None
    elif baseline is not None and openness < s.blink_closed_ratio * baseline and not track.shut:
        track.dip_start_s, track.dip_baseline = t_s, baseline
    if track.shut and baseline is not None and openness >= s.blink_open_ratio * baseline:
        track.shut = False
    if track.dip_start_s is None:  # frames of a dip would pull the open-eye baseline down
        track.samples.append((t_s, openness))
    reference = track.dip_baseline if track.dip_start_s is not None else baseline
    return BlinkEvidence(len(track.blink_ends_s), openness, openness / reference if reference else 1.0)


class Blink:
    """Per-track blink evidence; `observe(track_id, image, face_landmarks, t_s)` every frame."""

    def __init__(self, settings: LivenessConfig, *, models_dir: Path, threads: int = 1) -> None:
        self.settings = settings
        self.mesh = FaceMesh(onnx_path=Path(models_dir) / MODEL_FILE, threads=threads)
        self.tracks: dict[int, BlinkTrack] = {}

    def keep(self, track_ids) -> None:
        for gone in set(self.tracks) - set(track_ids):
            del self.tracks[gone]

    def observe(self, track_id: int, image_bgr: np.ndarray, points5: np.ndarray | None, t_s: float) -> BlinkEvidence:
        track = self.tracks.setdefault(track_id, BlinkTrack())
        if points5 is None:
            return BlinkEvidence(len(track.blink_ends_s))
        points, logit = self.mesh.infer(image_bgr, region_from_landmarks(np.asarray(points5, np.float64)))
        if logit < MIN_FACE_LOGIT:
            return BlinkEvidence(len(track.blink_ends_s))
        return add_sample(track, t_s, eye_openness(points), self.settings)
