"""res10 SSD detector: decode/filter logic on synthetic rows, and the real model on real photos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.config import DetectorConfig
from edge.detect import FaceDetector, decode
from edge.images import load_image

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "photos"
W, H = 640, 480


def row(score, x1, y1, x2, y2):
    return [0, 1, score, x1, y1, x2, y2]


def test_decode_keeps_a_confident_face_in_pixels():
    faces = decode(np.array([row(0.9, 0.25, 0.25, 0.5, 0.75)], np.float32), W, H, DetectorConfig())
    assert len(faces) == 1
    assert faces[0].box == pytest.approx((160, 120, 320, 360))
    assert faces[0].score == pytest.approx(0.9)


def test_decode_drops_low_scores_and_returns_empty_list():
    assert decode(np.array([row(0.3, 0.2, 0.2, 0.5, 0.6)], np.float32), W, H, DetectorConfig()) == []
    assert decode(np.zeros((0, 7), np.float32), W, H, DetectorConfig()) == []


def test_decode_rejects_spurious_box_running_off_the_corner():
    spurious = row(0.95, 0.8, 0.85, 1.4, 1.6)
    face = row(0.9, 0.3, 0.2, 0.5, 0.6)
    faces = decode(np.array([spurious, face], np.float32), W, H, DetectorConfig())
    assert len(faces) == 1 and faces[0].box[0] == pytest.approx(0.3 * W)


def test_decode_clips_a_slight_overhang():
    faces = decode(np.array([row(0.9, -0.01, 0.1, 0.3, 0.5)], np.float32), W, H, DetectorConfig())
    assert faces[0].box[0] == 0.0


def test_decode_rejects_implausible_aspect_and_small_faces():
    sliver = row(0.9, 0.1, 0.1, 0.12, 0.9)
    tiny = row(0.9, 0.5, 0.5, 0.52, 0.53)
    assert decode(np.array([sliver, tiny], np.float32), W, H, DetectorConfig(min_face_px=40)) == []


def test_decode_merges_overlapping_boxes_and_sorts_largest_first():
    rows = [row(0.8, 0.1, 0.1, 0.3, 0.4), row(0.9, 0.11, 0.1, 0.31, 0.41), row(0.95, 0.5, 0.2, 0.9, 0.8)]
    faces = decode(np.array(rows, np.float32), W, H, DetectorConfig())
    assert len(faces) == 2
    assert faces[0].area_px > faces[1].area_px
    assert faces[1].score == pytest.approx(0.9)


@pytest.fixture(scope="module")
def detector(models_dir):
    return FaceDetector(models_dir=models_dir)


def test_one_face_on_a_portrait(detector):
    image = load_image(SAMPLES / "obama.jpg")
    faces = detector.detect(image)
    assert len(faces) == 1
    left, top, right, bottom = faces[0].box
    assert 300 < left < 450 and 30 < top < 150 and 550 < right < 680 and 350 < bottom < 500
    assert faces[0].score > 0.9


def test_two_people_and_no_false_box_on_a_group_photo(detector, data_dir):
    faces = detector.detect(load_image(data_dir / "people/test/obama_and_biden.jpg"))
    assert len(faces) == 2


def test_blank_image_has_no_face(detector):
    assert detector.detect(np.full((480, 640, 3), 127, np.uint8)) == []


def test_thorough_search_finds_a_small_face_once_where_tiles_overlap(detector):
    import cv2

    photo = load_image(SAMPLES / "obama.jpg")
    whole = detector.detect(photo)[0]
    scale = 150 / whole.width_px
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    canvas = np.full((3000, 4000, 3), 90, np.uint8)
    # Tiles are 1280 px with a 960 px step: put the face where tiles 0 and 1 (and rows 0 and 1) overlap.
    left, top = 1000 - int(whole.box[0] * scale), 1000 - int(whole.box[1] * scale)
    canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
    assert detector.detect(canvas) == []
    faces = detector.detect(canvas, thorough=True)
    assert len(faces) == 1
    assert abs(faces[0].box[0] - 1000) < 10 and abs(faces[0].box[1] - 1000) < 10
