"""The blink cue's promises where edge/blink.py makes them: the crop geometry (centre to centre, size / side, the
second eye mirrored, a finite crop for a degenerate face), the model input in [0, 1] RGB, the blink rule at its
documented boundaries (baseline after MIN_BASELINE_FRAMES open frames, below blink_closed_ratio starts a dip, back
at blink_open_ratio ends it, within blink_max_s, remembered for blink_window_s) and the openness ratio it reports,
and Blink.observe keeping one state per track. Times and values are dyadic fractions, so every boundary is exact."""
from __future__ import annotations

import numpy as np
import pytest

from edge import blink
from edge.blink import Blink, BlinkTrack, Region, add_sample, crop, eye_openness, eye_regions, region_from_landmarks
from edge.config import LivenessConfig

STEP_S = 0.125
# closed below 0.5 of the baseline, open again from 0.75, a blink lasts at most 0.5 s, remembered for 1 s
RULE = LivenessConfig(mode="blink", blink_closed_ratio=0.5, blink_open_ratio=0.75, blink_max_s=0.5, blink_window_s=1.0)


def evidence(values, *, settings: LivenessConfig = RULE, start_s: float = 0.0):
    track = BlinkTrack()
    return [add_sample(track, start_s + i * STEP_S, v, settings) for i, v in enumerate(values)]


def blinks(values, **kwargs) -> int:
    return evidence(values, **kwargs)[-1].blinks


# ---- geometry ----------------------------------------------------------------------------------------------------


def apply(matrix: np.ndarray, point) -> np.ndarray:
    return matrix[:, :2] @ np.asarray(point, np.float64) + matrix[:, 2]


@pytest.mark.parametrize("mirrored", [False, True])
def test_a_crop_maps_the_region_centre_to_its_centre_at_size_over_side(mirrored):
    to_crop = Region((50.0, 40.0), 20.0, 0.0, mirrored=mirrored).to_crop(64)
    assert apply(to_crop, (50.0, 40.0)) == pytest.approx((32.0, 32.0))
    assert apply(to_crop, (60.0, 40.0)) == pytest.approx((0.0 if mirrored else 64.0, 32.0))  # 10 px = half the crop
    assert apply(to_crop, (50.0, 50.0)) == pytest.approx((32.0, 64.0))


def test_a_degenerate_face_still_gives_a_finite_crop_of_one_pixel_per_unit():
    """Eyes 0.5 px apart: the crop's side counts them as 1 px, and its centre lies ROI_CENTRE_DOWN eye distances
    straight below their midpoint."""
    points = np.array([[100.25, 50.0], [100.25, 50.0], [99.75, 50.0], [99.75, 50.0], [100.0, 50.2]])
    region = region_from_landmarks(points)
    assert region.side_px == pytest.approx(blink.ROI_SIDE_PER_EYES * 1.0)
    assert region.centre == pytest.approx((100.0, 50.0 + blink.ROI_CENTRE_DOWN * 0.5))
    mesh = np.zeros((blink.MESH_POINTS, 2))
    mesh[[33, 133, 362, 263]] = [(10.0, 5.0), (10.5, 5.0), (20.0, 5.0), (20.5, 5.0)]
    assert [r.side_px for r in eye_regions(mesh)] == pytest.approx([blink.EYE_SIDE_PER_CORNERS * 1.0] * 2)


def test_an_eye_narrower_than_a_pixel_is_measured_against_its_real_width():
    contour = np.zeros((blink.EYE_POINTS, 3))
    contour[list(blink.CONTOUR_CORNERS), :2] = (0.0, 0.0), (0.5, 0.0)
    for upper, lower in blink.LID_PAIRS:
        contour[upper, :2], contour[lower, :2] = (0.25, -0.125), (0.25, 0.125)
    assert eye_openness(contour) == pytest.approx(0.5)


def test_the_model_input_is_rgb_in_zero_to_one():
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 255  # blue in BGR
    patch = crop(image, Region((8.0, 8.0), 8.0, 0.0), 8)
    assert patch.shape == (1, 8, 8, 3) and patch.dtype == np.float32
    assert patch[0, 2:6, 2:6, 2] == pytest.approx(1.0) and patch[0, 2:6, 2:6, :2] == pytest.approx(0.0)


# ---- the blink rule at its boundaries ----------------------------------------------------------------------------


def test_a_dip_is_judged_from_the_min_baseline_frames_th_open_frame_on():
    assert blink.MIN_BASELINE_FRAMES == 3
    assert blinks([1.0, 1.0, 1.0, 0.25, 1.0]) == 1
    assert blinks([1.0, 1.0, 0.25, 1.0]) == 0


def test_exactly_the_closed_ratio_is_not_a_dip_and_exactly_the_open_ratio_ends_one():
    assert blinks([1.0, 1.0, 1.0, 0.5, 1.0]) == 0
    assert blinks([1.0, 1.0, 1.0, 0.25, 0.75]) == 1


def test_eyes_back_open_exactly_blink_max_s_after_closing_are_a_blink():
    closed = [0.25] * 4  # the dip starts at 0.375 s; 0.875 s is exactly 0.5 s later
    assert blinks([1.0, 1.0, 1.0, *closed, 1.0]) == 1
    assert blinks([1.0, 1.0, 1.0, *closed, 0.25, 1.0]) == 0  # 0.625 s: shut, not a blink


def test_after_eyes_shut_exactly_the_open_ratio_opens_them_again():
    shut = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]  # closed 0.625 s: shut
    values = evidence([*shut, 0.75, 0.25, 1.0], settings=RULE.model_copy(update={"blink_window_s": 5.0}))
    assert [e.blinks for e in values[-3:]] == [0, 0, 1]


def test_a_blink_and_the_open_eye_frames_are_remembered_for_exactly_the_window():
    first_blink = evidence([1.0, 1.0, 1.0, 0.25, 1.0])  # ends at 0.5 s
    track = BlinkTrack()
    for i, v in enumerate([1.0, 1.0, 1.0, 0.25, 1.0]):
        add_sample(track, i * STEP_S, v, RULE)
    assert first_blink[-1].blinks == 1 and add_sample(track, 1.5, 1.0, RULE).blinks == 1  # 1.0 s after its end
    assert add_sample(track, 1.625, 1.0, RULE).blinks == 0
    # three open frames from 0 s still make the baseline at 1.0 s, exactly the window later
    track = BlinkTrack()
    for t_s in (0.0, 0.125, 0.25):
        add_sample(track, t_s, 1.0, RULE)
    add_sample(track, 1.0, 0.25, RULE)
    assert add_sample(track, 1.125, 1.0, RULE).blinks == 1


def test_the_ratio_is_to_the_baseline_and_during_a_dip_to_the_baseline_it_started_from():
    assert evidence([0.3])[0].ratio == 1.0  # no baseline yet
    assert evidence([1.0, 1.0, 1.0, 0.875])[-1].ratio == pytest.approx(0.875)
    # open-eye frames 0.5, 1, 1, 0.5 (median 0.75); the dip starts at 0.5 s; at 0.625 s the first 0.5 has left the
    # window (0.5 s), so the baseline is now 1.0, but the dip is still measured against the 0.75 it started from
    values = evidence([0.5, 1.0, 1.0, 0.5, 0.25, 0.25], settings=RULE.model_copy(update={"blink_window_s": 0.5}))
    assert values[-1].ratio == pytest.approx(0.25 / 0.75)


# ---- one state per track, and frames without a usable face ----------------------------------------------------


class ScriptedEyes:
    """Stands in for FaceMesh + iris (the real models: tests/test_blink.py) to drive Blink.observe's bookkeeping:
    each call returns the next (openness, face logit)."""

    def __init__(self, readings) -> None:
        self.readings = list(readings)

    def openness(self, image_bgr, points5):
        return self.readings.pop(0)


def scripted_blink(readings) -> Blink:
    cue = Blink.__new__(Blink)
    cue.settings, cue.tracks, cue.eyes = RULE, {}, ScriptedEyes(readings)
    return cue


def test_each_track_has_its_own_blink_state():
    blinker, starer = [1.0, 1.0, 1.0, 0.25, 1.0], [1.0] * 5
    cue = scripted_blink([(v, 5.0) for pair in zip(blinker, starer) for v in pair])
    points = np.zeros((5, 2))
    for i in range(5):
        one = cue.observe(1, None, points, i * STEP_S)
        two = cue.observe(2, None, points, i * STEP_S)
    assert (one.blinks, two.blinks) == (1, 0)


def test_a_frame_without_landmarks_or_without_a_face_keeps_the_count_and_adds_nothing():
    cue = scripted_blink([(1.0, 5.0), (1.0, 5.0), (1.0, 5.0), (0.25, 5.0), (1.0, 5.0), (0.25, -1.0), (0.875, 0.0)])
    points = np.zeros((5, 2))
    for i in range(5):
        cue.observe(7, None, points, i * STEP_S)
    assert cue.observe(7, None, None, 0.625).blinks == 1  # no landmarks: nothing measured
    assert cue.observe(7, None, points, 0.75).blinks == 1  # FaceMesh's logit below 0: not a face, not a dip
    assert len(cue.tracks[7].samples) == 4
    at_zero = cue.observe(7, None, points, 0.875)  # a logit of exactly MIN_FACE_LOGIT is a face
    assert at_zero.openness == 0.875 and len(cue.tracks[7].samples) == 5
