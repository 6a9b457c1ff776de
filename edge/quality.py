"""Enrolment quality gates: a template is only as good as the photo it came from. Each gate names its reason."""
from __future__ import annotations

import cv2
import numpy as np

from edge.config import EnrollConfig
from edge.types import EmbeddedFace

# dlib 5-point order: 0/1 outer/inner corner of the eye on the image's right, 2/3 of the other eye, 4 nose base.
RIGHT_EYE, LEFT_EYE, NOSE = (0, 1), (2, 3), 4


def sharpness(chip: np.ndarray) -> float:
    """Variance of the Laplacian of the grey chip: low means blurred or featureless."""
    grey = cv2.cvtColor(chip, cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def yaw_ratio(landmarks: np.ndarray) -> float:
    """How far the nose sits off the eyes' midpoint, along the eye line, as a fraction of the eye distance (0 = frontal)."""
    right = landmarks[list(RIGHT_EYE)].mean(axis=0)
    left = landmarks[list(LEFT_EYE)].mean(axis=0)
    axis = right - left
    eye_distance = float(np.linalg.norm(axis))
    if eye_distance == 0.0:
        return float("inf")
    offset = landmarks[NOSE] - (right + left) / 2
    return abs(float(offset @ axis)) / eye_distance**2


def quality_problem(face: EmbeddedFace, config: EnrollConfig) -> str | None:
    """None when the face is good enough to enrol, else a short reason a person can act on."""
    width_px = face.face.width_px
    if width_px < config.min_face_px:
        return f"face too small ({width_px:.0f} px wide, need {config.min_face_px}): come closer or use a larger photo"
    score = sharpness(face.chip)
    if score < config.min_sharpness:
        return f"face too blurred (sharpness {score:.0f}, need {config.min_sharpness:.0f}): hold still, add light"
    yaw = yaw_ratio(face.face.landmarks)
    if yaw > config.max_yaw_ratio:
        return f"face not frontal enough (yaw {yaw:.2f}, limit {config.max_yaw_ratio}): look at the camera"
    return None


def quality_score(face: EmbeddedFace) -> float:
    """Ranks acceptable candidates (button enrolment picks the best over several frames): bigger, sharper, more frontal."""
    return face.face.width_px * np.log1p(sharpness(face.chip)) * (1.0 - min(yaw_ratio(face.face.landmarks), 1.0))
