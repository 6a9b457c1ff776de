"""The quality weight and the fused template as documented in edge/fuse.py: full weight from FULL_WEIGHT_FACE_PX
wide, half weight at HALF_WEIGHT_SHARPNESS, linear in yaw down to 0 at ZERO_WEIGHT_YAW, a weighted and re-normalised
mean, None when nothing counts."""
from __future__ import annotations

import numpy as np
import pytest

from edge.fuse import (FULL_WEIGHT_FACE_PX, HALF_WEIGHT_SHARPNESS, ZERO_WEIGHT_YAW, TrackTemplate, face_weight,
                       fused, quality_weight)
from edge.quality import sharpness, yaw_ratio
from edge.types import EmbeddedFace, Face

SHARP = 1e12  # sharpness term 1 to within 2e-11
A, B = np.eye(128)[0], np.eye(128)[1]


@pytest.mark.parametrize(("width_px", "term"), [(FULL_WEIGHT_FACE_PX * 2, 1.0), (FULL_WEIGHT_FACE_PX, 1.0),
                                                  (FULL_WEIGHT_FACE_PX / 4, 0.25), (0.0, 0.0), (-8.0, 0.0)])
def test_size_counts_fully_from_full_weight_face_px_and_linearly_below_never_below_zero(width_px, term):
    assert quality_weight(width_px, SHARP, 0.0) == pytest.approx(term)


@pytest.mark.parametrize(("sharpness_value", "term"), [(HALF_WEIGHT_SHARPNESS, 0.5), (3 * HALF_WEIGHT_SHARPNESS, 0.75),
                                                         (0.0, 0.0), (-5.0, 0.0)])
def test_sharpness_counts_half_at_half_weight_sharpness_and_never_below_zero(sharpness_value, term):
    assert quality_weight(FULL_WEIGHT_FACE_PX, sharpness_value, 0.0) == pytest.approx(term)


@pytest.mark.parametrize(("yaw", "term"), [(0.0, 1.0), (ZERO_WEIGHT_YAW / 4, 0.75), (ZERO_WEIGHT_YAW, 0.0),
                                           (2 * ZERO_WEIGHT_YAW, 0.0), (-ZERO_WEIGHT_YAW, 1.0)])
def test_yaw_counts_linearly_from_frontal_down_to_zero_weight_yaw(yaw, term):
    assert quality_weight(FULL_WEIGHT_FACE_PX, SHARP, yaw) == pytest.approx(term)


def test_the_weight_is_the_product_of_its_terms_broadcast_over_faces():
    weights = quality_weight([FULL_WEIGHT_FACE_PX / 2, FULL_WEIGHT_FACE_PX], HALF_WEIGHT_SHARPNESS, ZERO_WEIGHT_YAW / 2)
    assert weights == pytest.approx([0.125, 0.25])


def test_fused_is_the_unit_weighted_mean():
    both = fused(np.stack([A, B]))
    assert both.dtype == np.float32 and both == pytest.approx((A + B) / np.sqrt(2))
    assert fused(np.stack([A, B]), [3.0, 1.0]) == pytest.approx((3 * A + B) / np.sqrt(10))
    assert fused(np.stack([A, B]), [0.0, 2.0]) == pytest.approx(B)


def test_fused_is_none_when_nothing_counts_or_the_mean_has_no_direction():
    assert fused(np.stack([A, B]), [0.0, 0.0]) is None
    assert fused(np.stack([A, -A])) is None


def test_a_template_counts_only_frames_of_positive_weight():
    template = TrackTemplate(window_frames=4)
    assert template.frames == 0 and template.vector() is None  # a new track has no template yet
    for weight in (0.0, 0.5, 0.0, 1e-9):
        template.add(A, weight)
    assert template.frames == 2


def face_of(width_px: float, landmarks: np.ndarray | None) -> EmbeddedFace:
    chip = np.random.default_rng(1).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    return EmbeddedFace(Face((10.0, 20.0, 10.0 + width_px, 20.0 + 2 * width_px), 0.9, landmarks), chip, A)  # tall box


def test_face_weight_reads_the_box_width_the_chip_sharpness_and_the_landmark_yaw():
    turned = np.array([[220, 170], [200, 170], [160, 170], [140, 170], [195, 215]], np.float64)
    face = face_of(FULL_WEIGHT_FACE_PX / 2, turned)
    expected = quality_weight(FULL_WEIGHT_FACE_PX / 2, sharpness(face.chip), yaw_ratio(turned))
    assert 0.0 < yaw_ratio(turned) < ZERO_WEIGHT_YAW and face_weight(face) == pytest.approx(float(expected))
    frontal = face_of(FULL_WEIGHT_FACE_PX / 2, None)  # no landmarks: taken as frontal
    expected = quality_weight(FULL_WEIGHT_FACE_PX / 2, sharpness(frontal.chip), 0.0)
    assert face_weight(frontal) == pytest.approx(float(expected))
