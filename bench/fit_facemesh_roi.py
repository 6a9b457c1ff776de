"""Fit where edge.blink cuts the FaceMesh crop from a face's 5-point landmarks (ROI_CENTRE_DOWN, ROI_SIDE_PER_EYES).

FaceMesh was trained on crops MediaPipe derives from its own 468 landmarks: the box of the landmarks, turned so
the eyes (points 33 and 263) are level, made square on its longer side and scaled by 1.5. Per face in the
photos this starts from the current constants, runs FaceMesh, recomputes that crop from its landmarks three
times (it settles), and expresses the settled crop in inter-eye distances of the 5-point landmarks: how far
its centre lies below the eye midpoint and its side. Prints the medians.
Usage: python bench/fit_facemesh_roi.py PHOTO_OR_DIR...
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge import blink  # noqa: E402
from edge.config import Config  # noqa: E402
from edge.images import load_image  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402

MEDIAPIPE_SCALE = 1.5
SETTLE_ROUNDS = 3
SUFFIXES = {".jpg", ".jpeg", ".png"}


def mediapipe_region(region: blink.Region, points: np.ndarray) -> blink.Region:
    """MediaPipe's next crop from FaceMesh points (crop pixels of `region`)."""
    frame_points = region.to_frame(points, blink.MESH_PX)
    across = frame_points[263] - frame_points[33]
    angle = float(np.arctan2(across[1], across[0]))
    cos, sin = np.cos(angle), np.sin(angle)
    level = frame_points @ np.array([[cos, -sin], [sin, cos]])  # rotated so the eye line is horizontal
    low, high = level.min(axis=0), level.max(axis=0)
    centre = ((low + high) / 2) @ np.array([[cos, sin], [-sin, cos]])
    return blink.Region((float(centre[0]), float(centre[1])), MEDIAPIPE_SCALE * float(np.max(high - low)), angle)


def main(paths: list[str]) -> int:
    pipeline = Pipeline(Config())
    eyes = blink.EyeLandmarks(models_dir=pipeline.config.resolved_models_dir(), threads=1)
    photos = [p for arg in map(Path, paths) for p in (sorted(arg.rglob("*")) if arg.is_dir() else [arg])
              if p.suffix.lower() in SUFFIXES]
    downs, sides = [], []
    for photo in photos:
        image = load_image(photo)
        for face in pipeline.locate(image, thorough=True):
            region = blink.region_from_landmarks(face.landmarks)
            for _ in range(SETTLE_ROUNDS):
                points, logit = eyes.mesh(image, region)
                region = mediapipe_region(region, points)
            points, logit = eyes.mesh(image, region)
            if logit < blink.MIN_FACE_LOGIT:
                continue
            right = face.landmarks[list(blink.RIGHT_EYE_POINTS)].mean(axis=0)
            left = face.landmarks[list(blink.LEFT_EYE_POINTS)].mean(axis=0)
            eyes_px = float(np.hypot(*(right - left)))
            down = np.array([-(right - left)[1], (right - left)[0]]) / eyes_px
            downs.append(float((np.array(region.centre) - (left + right) / 2) @ down) / eyes_px)
            sides.append(region.side_px / eyes_px)
    def spread(values: list[float]) -> str:
        return f"{np.median(values):.3f} (MAD {np.median(np.abs(np.array(values) - np.median(values))):.3f})"

    print(f"{len(downs)} faces: centre down {spread(downs)}, side {spread(sides)} inter-eye distances")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
