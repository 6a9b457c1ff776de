"""The liveness rule as the README states it, at its boundaries: pending until `min_pairs` keyframe steps in which the
face moved between `min_motion` and `max_motion` (both included), then pass when their median parallax is at least
`min_parallax`; the evidence reported with the verdict; the crop the points are followed in."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from edge.config import LivenessConfig
from edge.liveness import (CORNER_MIN_DISTANCE_PX, FAIL, INNER, LK_WINDOW_PX, MIN_PAIRED_POINTS, PASS, PENDING,
                           RANSAC_FACE_FRACTION, Keyframe, Liveness, LivenessVerdict, TrackState, crop_geometry,
                           crop_matrix, grey_crop, planar_residual)
from edge.types import Face, Frame

SETTINGS = LivenessConfig(min_pairs=3, min_motion=0.02, max_motion=0.55, min_parallax=0.006, keyframe_s=0.2)
IMAGE = np.zeros((4, 4), np.uint8)


def judged(steps: list[tuple[float, float | None]], *, t_s: float = 5.0, points: int = 7) -> LivenessVerdict:
    """The verdict on keyframes 0.2 s apart from t = 1 s, each (motion, parallax residual) since the previous one."""
    keyframes = [Keyframe(1.0 + 0.2 * i, np.zeros(0, np.int64), np.zeros((0, 2), np.float32), IMAGE, (), residual,
                          motion) for i, (motion, residual) in enumerate(steps)]
    state = TrackState(IMAGE, (0.0, 0.0, 1.0, 1.0), ids=np.arange(points), keyframes=keyframes)
    return Liveness(SETTINGS)._judge(state, t_s)


def test_pending_until_min_pairs_moving_steps():
    assert judged([(0.1, 0.01)] * 2) == LivenessVerdict(PENDING, points=7)
    assert judged([(0.1, 0.01)] * 3).state == PASS


@pytest.mark.parametrize(("motion", "counts"), [(0.02, True), (math.nextafter(0.02, 0), False), (0.55, True),
                                                (math.nextafter(0.55, 1), False)])
def test_a_step_counts_when_the_face_moved_between_min_and_max_motion_inclusive(motion, counts):
    verdict = judged([(0.1, 0.01), (0.1, 0.01), (motion, 0.01)])
    assert verdict.state == (PASS if counts else PENDING)


def test_a_step_without_a_fitted_homography_does_not_count():
    assert judged([(0.1, 0.01), (0.1, 0.01), (0.1, None)]).state == PENDING


@pytest.mark.parametrize(("parallax", "state"), [(0.006, PASS), (math.nextafter(0.006, 0), FAIL)])
def test_pass_needs_a_median_parallax_of_at_least_min_parallax(parallax, state):
    assert judged([(0.1, 0.0), (0.1, parallax), (0.1, 1.0)]).state == state


def test_the_verdict_carries_the_median_evidence_of_the_moving_steps():
    verdict = judged([(0.5, 0.001), (0.01, 0.5), (0.03, 0.002), (0.04, 0.9)], t_s=2.0, points=9)
    # the second step did not move enough: steps 1, 3 and 4 (from t = 1.0 s) count
    assert verdict == LivenessVerdict(FAIL, parallax=0.002, motion=0.04, points=9,
                                      evidence_s=pytest.approx(2.0 - 1.0 + 0.2))


def test_evidence_is_reported_rounded():
    verdict = LivenessVerdict(PASS, parallax=0.0123456, motion=0.0654321, points=41, evidence_s=1.23456)
    assert verdict.evidence() == {"parallax": 0.0123, "motion": 0.0654, "points": 41, "evidence_s": 1.23}
    blinked = LivenessVerdict(PASS, blinks=2, openness=0.2345678, openness_ratio=0.8765432)  # blink cue on
    assert blinked.evidence() == {"parallax": 0.0, "motion": 0.0, "points": 0, "evidence_s": 0.0, "blinks": 2,
                                  "openness": 0.2346, "openness_ratio": 0.877}


def test_the_crop_covers_both_boxes_with_a_quarter_face_margin_and_scales_the_face_to_work_px():
    assert crop_geometry((100.0, 100.0, 200.0, 200.0), (110.0, 90.0, 210.0, 190.0), (480, 640, 3), 50) == (
        75, 65, 235, 225, 0.5)
    assert crop_geometry((10.0, 5.0, 110.0, 105.0), (10.0, 5.0, 110.0, 105.0), (100, 100, 3), 400) == (
        0, 0, 100, 100, 1.0), "clipped to the image, never enlarged"
    # every coordinate distinct: x from x, y from y, the width from x, clipped at the image's height
    assert crop_geometry((40.0, 10.0, 80.0, 70.0), (44.0, 16.0, 76.0, 60.0), (75, 300, 3), 20) == (30, 0, 90, 75, 0.5)
    # a 1.5-px face: a margin of a quarter of its own width (the 1-px floor only guards a zero width)
    assert crop_geometry((100.4, 50.0, 101.9, 52.0), (100.4, 50.0, 101.9, 52.0), (200, 200, 3), 120) == (
        100, 49, 102, 52, 1.0)


def test_crop_matrix_maps_frame_pixels_into_the_scaled_crop():
    matrix = crop_matrix((75, 65, 235, 225, 0.5))
    assert matrix @ np.array([75.0, 65.0, 1.0]) == pytest.approx([0.0, 0.0, 1.0])
    assert matrix @ np.array([175.0, 165.0, 1.0]) == pytest.approx([50.0, 50.0, 1.0])


def test_grey_crop_is_the_cut_of_the_grey_frame_scaled_down_and_never_a_view():
    image = np.random.default_rng(2).integers(0, 256, (60, 80), dtype=np.uint8)
    cut = grey_crop(image, (10, 20, 50, 60, 1.0))
    assert np.array_equal(cut, image[20:60, 10:50]) and not np.shares_memory(cut, image)
    shrunk = grey_crop(image, (10, 20, 50, 60, 0.3))  # area-averaged: no aliasing of the tracked texture
    assert shrunk.shape == (12, 12) and np.array_equal(shrunk, cv2.resize(image[20:60, 10:50], (12, 12),
                                                                          interpolation=cv2.INTER_AREA))


# ---- the planar fit between two keyframes ------------------------------------------------------------------------

SHIFT_PX = np.array([3.0, 2.0], np.float32)  # a picture moved between two keyframes
BOX = (100.0, 100.0, 300.0, 300.0)
WORK_PX = 120
RANSAC_PX = RANSAC_FACE_FRACTION * (BOX[2] - BOX[0])


def picture_keyframes(points: int, outliers: int = 0) -> tuple[Keyframe, Keyframe, np.ndarray, np.ndarray]:
    """Two keyframes of a flat textured picture moved by SHIFT_PX (the face box follows it and grows a little, so
    the two crops differ in place and size), with `points` tracked corners and `outliers` of them mis-tracked."""
    frame = cv2.GaussianBlur(np.random.default_rng(3).integers(0, 256, (400, 400)).astype(np.uint8), (0, 0), 2.0)
    moved = cv2.warpAffine(frame, np.float32([[1, 0, SHIFT_PX[0]], [0, 1, SHIFT_PX[1]]]), (400, 400))
    moved_box = (BOX[0] + SHIFT_PX[0], BOX[1] + SHIFT_PX[1], BOX[2] + 2 * SHIFT_PX[0], BOX[3] + 2 * SHIFT_PX[1])
    before_geometry = crop_geometry(BOX, BOX, frame.shape, WORK_PX)
    now_geometry = crop_geometry(moved_box, moved_box, frame.shape, WORK_PX)
    corners = cv2.goodFeaturesToTrack(frame[130:270, 130:270], points, 0.01, 10).reshape(-1, 2) + 130
    assert len(corners) == points
    source = corners.astype(np.float32)
    target = source + SHIFT_PX
    target[:outliers] += np.float32([12.0, -12.0])
    ids = np.arange(points)
    before = Keyframe(0.0, ids, source, grey_crop(frame, before_geometry), before_geometry)
    now = Keyframe(0.2, ids, target, grey_crop(moved, now_geometry), now_geometry)
    return before, now, source, target


def test_a_moved_picture_leaves_no_residual_from_min_paired_points_on():
    before, now, source, target = picture_keyframes(MIN_PAIRED_POINTS)
    assert now.grey.shape != before.grey.shape
    residual = planar_residual(before, now, source, target, RANSAC_PX)
    assert residual is not None and residual < 0.2
    assert planar_residual(before, now, source[1:], target[1:], RANSAC_PX) is None


def test_mis_tracked_points_do_not_bend_the_plane():
    """RANSAC: a few points that lost their corner must not turn a picture's fit into fake depth."""
    before, now, source, target = picture_keyframes(30, outliers=8)
    assert planar_residual(before, now, source, target, RANSAC_PX) < 0.2


# ---- which points are followed -----------------------------------------------------------------------------------

WIDE_BOX = (100.0, 150.0, 300.0, 310.0)  # 200 x 160: width and height differ, so do left and top
SCENE = cv2.cvtColor(cv2.GaussianBlur(np.random.default_rng(4).integers(0, 256, (400, 400)).astype(np.uint8), (0, 0),
                                      2.0), cv2.COLOR_GRAY2BGR)  # texture everywhere: background corners too
COVER = np.full_like(SCENE, 128)  # something held in front of the face: no texture to follow


def test_new_points_are_taken_inside_the_face_box_shrunk_by_inner():
    live = Liveness(LivenessConfig())
    live.observe(1, Frame(SCENE, 0, 0.0), Face(WIDE_BOX, 0.9))
    points = live.tracks[1].points
    width, height = WIDE_BOX[2] - WIDE_BOX[0], WIDE_BOX[3] - WIDE_BOX[1]
    left, right = WIDE_BOX[0] + INNER * width, WIDE_BOX[2] - INNER * width
    top, bottom = WIDE_BOX[1] + INNER * height, WIDE_BOX[3] - INNER * height
    crop_px = 1 / crop_geometry(WIDE_BOX, WIDE_BOX, SCENE.shape, LivenessConfig().work_px)[4]  # rounding to crop pixels
    assert len(points) == LivenessConfig().max_points
    assert points[:, 0].min() >= left - crop_px and points[:, 0].max() <= right + crop_px
    assert points[:, 1].min() >= top - crop_px and points[:, 1].max() <= bottom + crop_px
    near = 0.1 * width  # and they fill that box: some lie near each of its sides
    assert points[:, 0].min() < left + near and points[:, 0].max() > right - near
    assert points[:, 1].min() < top + near and points[:, 1].max() > bottom - near


def test_points_whose_patch_got_covered_are_dropped_and_the_rest_follow_the_face():
    live = Liveness(LivenessConfig())
    live.observe(1, Frame(SCENE, 0, 0.0), Face(WIDE_BOX, 0.9))
    first = dict(zip(live.tracks[1].ids.tolist(), live.tracks[1].points))
    moved = np.roll(SCENE, (1, 2), axis=(0, 1))  # the face moved 2 px right and 1 px down ...
    middle = int((WIDE_BOX[0] + WIDE_BOX[2]) / 2)
    moved[:, middle:] = COVER[:, middle:]  # ... and its right half got covered
    live.observe(1, Frame(moved, 1, 0.04), Face(WIDE_BOX, 0.9))
    kept = {i: p for i, p in zip(live.tracks[1].ids.tolist(), live.tracks[1].points) if i in first}
    scale = crop_geometry(WIDE_BOX, WIDE_BOX, SCENE.shape, LivenessConfig().work_px)[4]
    straddling = LK_WINDOW_PX / 2 / scale  # a point this close to the cover still has half its patch visible
    assert len(kept) >= 10
    assert max(first[i][0] for i in kept) < middle + straddling, "a point on the covered half was kept"
    assert np.median([p - first[i] for i, p in kept.items()], axis=0) == pytest.approx([2.0, 1.0], abs=0.05)


def test_when_half_the_points_are_lost_new_ones_fill_up_to_max_points_away_from_those_followed():
    live = Liveness(LivenessConfig())
    live.observe(1, Frame(SCENE, 0, 0.0), Face(WIDE_BOX, 0.9))
    moved = np.roll(SCENE, (1, 2), axis=(0, 1))
    cut = int(WIDE_BOX[0] + 0.4 * (WIDE_BOX[2] - WIDE_BOX[0]))
    moved[:, cut:] = COVER[:, cut:]  # 60 % of the face got covered
    live.observe(1, Frame(moved, 1, 0.04), Face(WIDE_BOX, 0.9))
    state, settings = live.tracks[1], LivenessConfig()
    followed = state.ids < settings.max_points
    assert 0 < followed.sum() < settings.max_points // 2 and len(state.ids) == settings.max_points
    scale = crop_geometry(WIDE_BOX, WIDE_BOX, SCENE.shape, settings.work_px)[4]
    gaps = np.linalg.norm(state.points[~followed, None] - state.points[None, followed], axis=2) * scale
    assert gaps.min() >= CORNER_MIN_DISTANCE_PX - 1, "a new corner on top of a followed point"


def test_a_point_id_is_never_reused_on_its_track_however_often_it_refills():
    """Keyframes pair points by id: an id given again to a new corner would pair two unrelated points."""
    live, settings = Liveness(LivenessConfig()), LivenessConfig()
    geometry = crop_geometry(WIDE_BOX, WIDE_BOX, SCENE.shape, settings.work_px)
    grey = grey_crop(cv2.cvtColor(SCENE, cv2.COLOR_BGR2GRAY), geometry)
    state = TrackState(grey, WIDE_BOX)
    given = []
    for _ in range(4):
        before = set(state.ids.tolist())
        live._add_points(state, grey, WIDE_BOX, geometry)
        fresh = [i for i in state.ids.tolist() if i not in before]
        assert fresh and not set(fresh) & set(given), "an id given out before was given again"
        given += fresh
        kept = len(state.ids) // 3  # two thirds of the points lost
        state.ids, state.points = state.ids[-kept:], state.points[-kept:]


def test_the_blink_cue_keeps_a_state_per_track():
    """One Liveness per camera, state per track id: the blink cue is fed each face under its own track."""
    from edge.blink import BlinkEvidence

    fed = []

    class Recorder:
        def observe(self, track_id, image, landmarks, t_s):
            fed.append(track_id)
            return BlinkEvidence(0, 0.3, 1.0)

    live = Liveness(LivenessConfig(mode="parallax"))  # built without the eye models, then switched to blink
    live.settings, live.blink = LivenessConfig(mode="blink"), Recorder()
    frame = Frame(np.zeros((240, 320, 3), np.uint8), 0, 0.0)
    for track in (7, 9):
        assert live.observe(track, frame, Face((100.0, 50.0, 200.0, 150.0), 0.9)).state == PENDING
    assert fed == [7, 9]
