"""align_chip: synthetic geometry checks, and parity with dlib.get_face_chip on real photos."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from edge.align import _pyramid_down, align_chip, chip_points, mirror_chip

SIZE_PX = 150


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random but smooth colour image, so half-pixel shifts change values by little."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 3)


def _pattern_chip() -> np.ndarray:
    """An upright test card in chip space: bright top-left quadrant, a dark bar across the bottom, grey elsewhere."""
    chip = np.full((SIZE_PX, SIZE_PX, 3), 128, np.uint8)
    chip[20:70, 20:70] = (250, 200, 150)
    chip[110:130, 30:120] = (10, 40, 70)
    return chip


def test_template_points_scale_with_padding_and_size() -> None:
    points = chip_points(SIZE_PX, 0.25)
    assert points.shape == (5, 2)
    # The nose base sits below both eyes; the eye on the image's right (points 0, 1) is right of the other one.
    assert points[4, 1] > points[:4, 1].max()
    assert points[0, 0] > points[1, 0] > points[3, 0] > points[2, 0]
    # padding p maps template t to (p + t) / (1 + 2p) · size.
    assert chip_points(100, 0.0)[4] == pytest.approx([49.01123135679, 62.77975316475])
    assert chip_points(SIZE_PX, 0.25)[4, 0] == pytest.approx((0.25 + 0.4901123135679) / 1.5 * SIZE_PX)


def test_landmarks_at_template_give_half_pixel_shifted_copy() -> None:
    image = _smooth_image(SIZE_PX, SIZE_PX)
    chip = align_chip(image, chip_points(SIZE_PX, 0.25))
    assert chip.shape == (SIZE_PX, SIZE_PX, 3) and chip.dtype == np.uint8
    # dlib's chip rectangle spans 150·s − 1 pixels centred on (75, 75): chip pixel c samples image x = c + 0.5,
    # the mean of a 2×2 block truncated; the last row and column need a neighbour outside the image: black.
    # The fitted scale is 1 only to rounding, so a block mean that is a whole number may truncate one lower.
    block = image.astype(np.float64)
    mean = (block[:-1, :-1] + block[:-1, 1:] + block[1:, :-1] + block[1:, 1:]) / 4
    inner = chip[:-1, :-1].astype(np.float64)
    exact = inner == np.floor(mean)
    assert np.all(exact | ((inner == mean - 1) & (mean == np.floor(mean))))
    assert exact.mean() > 0.85
    assert not chip[-1].any() and not chip[:, -1].any()


@pytest.mark.parametrize("angle_deg, scale", [(0.0, 1.0), (25.0, 1.7), (-40.0, 3.3), (170.0, 5.0)])
def test_rotated_and_scaled_face_comes_back_upright(angle_deg: float, scale: float) -> None:
    card = _pattern_chip()
    canvas_px = int(SIZE_PX * scale * 1.6) + 20
    centre = np.array([canvas_px / 2, canvas_px / 2])
    # Chip → image similarity: rotate by angle, scale, put the chip centre at the canvas centre.
    cos_a, sin_a = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    linear = scale * np.array([[cos_a, -sin_a], [sin_a, cos_a]])
    offset = centre - linear @ np.array([SIZE_PX / 2, SIZE_PX / 2])
    image = cv2.warpAffine(card, np.hstack([linear, offset[:, None]]), (canvas_px, canvas_px),
                           flags=cv2.INTER_LINEAR, borderValue=(128, 128, 128))
    landmarks = chip_points(SIZE_PX, 0.25) @ linear.T + offset

    chip = align_chip(image, landmarks)

    assert chip.shape == (SIZE_PX, SIZE_PX, 3) and chip.dtype == np.uint8
    # Away from the card's edges (where blur and the half-pixel convention act) the chip is the card again.
    assert np.abs(chip[25:65, 25:65].astype(int) - card[25:65, 25:65]).max() <= 3
    assert np.abs(chip[114:126, 36:114].astype(int) - card[114:126, 36:114]).max() <= 3
    assert np.abs(chip[75:100, 80:140].astype(int) - 128).max() <= 3
    assert np.abs(chip.astype(int) - card).mean() < 3


def test_channel_order_and_grey_input() -> None:
    image = _smooth_image(300, 400, seed=1)
    landmarks = chip_points(SIZE_PX, 0.25) * 1.2 + (90, 40)
    rgb = align_chip(image, landmarks)
    assert np.array_equal(align_chip(image[:, :, ::-1], landmarks), rgb[:, :, ::-1])
    grey = image[:, :, 1].copy()
    grey_chip = align_chip(grey, landmarks)
    assert grey_chip.shape == (SIZE_PX, SIZE_PX, 3)
    assert np.array_equal(grey_chip[:, :, 0], rgb[:, :, 1]) and np.array_equal(grey_chip[:, :, 2], rgb[:, :, 1])
    assert align_chip(image, landmarks, size_px=80).shape == (80, 80, 3)


def test_face_outside_image_is_black() -> None:
    image = _smooth_image(200, 200, seed=2)
    assert not align_chip(image, chip_points(SIZE_PX, 0.25) + 1000).any()
    half_out = align_chip(image, chip_points(SIZE_PX, 0.25) - (75, 0))
    assert not half_out[:, :60].any() and half_out[:, 90:140].all()


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        align_chip(np.zeros((10, 10, 3), np.float32), chip_points())
    with pytest.raises(ValueError, match="landmarks"):
        align_chip(np.zeros((10, 10, 3), np.uint8), np.zeros((68, 2)))


def test_mirror_chip_flips_left_right() -> None:
    chip = _pattern_chip()
    assert np.array_equal(mirror_chip(chip)[:, 0], chip[:, -1])
    assert np.array_equal(mirror_chip(mirror_chip(chip)), chip)


@pytest.mark.parametrize("shape", [(9, 9, 3), (37, 52, 3), (120, 97, 3), (64, 81)])
def test_pyramid_level_matches_integer_definition(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    image[:5, :5] = 255  # the largest sums must not overflow or round
    taps = np.array([1, 4, 6, 4, 1])
    out_h, out_w = (shape[0] - 3) // 2, (shape[1] - 3) // 2
    wide = image.astype(np.int64)
    rows = sum(t * wide[:, k : k + 2 * out_w : 2] for k, t in enumerate(taps))
    expected = sum(t * rows[k : k + 2 * out_h : 2] for k, t in enumerate(taps)) // 256
    assert np.array_equal(_pyramid_down(image), expected)
    assert _pyramid_down(image[:8]).size == 0


# Photos for the parity test: large ones (the pyramid path; 4600 and 4352 px), faces running off the border
# (black fill), rotated and small faces, several faces per photo. Kept to ~5 s of HOG detection.
PARITY_PHOTOS = (
    "pairs/img1.jpg",
    "pairs/img3.jpg",
    "pairs/img4.jpg",
    "pairs/img40.jpg",
    "pairs/img49.jpg",
    "pairs/img45.jpg",
    "pairs/img46.jpg",
    "pairs/img24.jpg",
    "pairs/img10.jpg",
    "stills/obama_partial_face.jpg",
    "stills/selfie-many-people.jpg",
    "stills/multiface.jpg",
    "stills/obama-480p.jpg",
    "stills/couple.jpg",
    "people/test/obama_and_biden.jpg",
    "people/test/kit_with_rose.jpg",
)
# Only two faces in the data run off the image, so these photos are also cropped through their first face,
# once per side (a crop keeps full resolution; the landmarks move with it).
BORDER_CROP_PHOTOS = ("pairs/img1.jpg", "pairs/img10.jpg")


def _border_crops(dlib, rgb: np.ndarray, shape) -> list[tuple[np.ndarray, object]]:
    """The image cut at the nose base from each side in turn, with the shape moved into the crop."""
    nose = shape.part(4)
    height, width = rgb.shape[:2]
    cases = []
    for left, top, right, bottom in ((nose.x, 0, width, height), (0, nose.y, width, height),
                                     (0, 0, nose.x, height), (0, 0, width, nose.y)):
        points = dlib.points([dlib.point(p.x - left, p.y - top) for p in shape.parts()])
        rect = dlib.rectangle(0, 0, right - left - 1, bottom - top - 1)
        cases.append((np.ascontiguousarray(rgb[top:bottom, left:right]), dlib.full_object_detection(rect, points)))
    return cases


def _runs_off_image(dlib, shape, width: int, height: int) -> bool:
    """Whether dlib's (rotated) chip rectangle leaves the image, so the chip has black fill."""
    details = dlib.get_face_chip_details(shape, SIZE_PX, 0.25)
    rect = details.rect
    cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
    cos_a, sin_a = math.cos(details.angle), math.sin(details.angle)
    for x in (rect.left(), rect.right()):
        for y in (rect.top(), rect.bottom()):
            px, py = cos_a * (x - cx) - sin_a * (y - cy) + cx, sin_a * (x - cx) + cos_a * (y - cy) + cy
            if not (0 <= px <= width - 1 and 0 <= py <= height - 1):
                return True
    return False


def test_parity_with_dlib_get_face_chip(dlib, data_dir) -> None:
    face_recognition_models = pytest.importorskip("face_recognition_models")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    cases = []
    for name in PARITY_PHOTOS:
        rgb = cv2.cvtColor(cv2.imread(str(data_dir / name)), cv2.COLOR_BGR2RGB)
        shapes = [predictor(rgb, box) for box in detector(rgb, 0)]
        assert shapes, f"no face found in {name}"
        cases += [(name, rgb, shape) for shape in shapes]
        if name in BORDER_CROP_PHOTOS:
            cases += [(f"{name} (cropped)", crop, moved) for crop, moved in _border_crops(dlib, rgb, shapes[0])]

    means, maxima, pyramid_faces, border_faces = [], [], 0, 0
    for name, rgb, shape in cases:
        reference = dlib.get_face_chip(rgb, shape, size=SIZE_PX, padding=0.25)
        landmarks = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
        diff = np.abs(align_chip(rgb, landmarks).astype(int) - reference.astype(int))
        assert diff.mean() <= 1, f"{name} face at {shape.rect}: mean |diff| {diff.mean():.3f}"
        means.append(diff.mean())
        maxima.append(int(diff.max()))
        # dlib halves the image first once the chip rectangle is over twice the chip's side.
        pyramid_faces += dlib.get_face_chip_details(shape, SIZE_PX, 0.25).rect.width() > 2 * SIZE_PX
        border_faces += _runs_off_image(dlib, shape, rgb.shape[1], rgb.shape[0])
    identical = sum(m == 0 for m in maxima)
    print(f"\nalign parity: {len(maxima)} chips ({pyramid_faces} via the pyramid, {border_faces} off the border), "
          f"{identical} bit-identical, mean |diff| {np.mean(means):.4f}, max |diff| {max(maxima)}")
    assert len(maxima) >= 20
    assert pyramid_faces >= 5 and border_faces >= 6


def test_bilinear_sampling_is_the_float64_formula_bit_for_bit() -> None:
    """The sampler computes (1 − fy)·((1 − fx)·tl + fx·tr) + fy·((1 − fx)·bl + fx·br) in float64, truncated, 0 where
    the 2×2 neighbourhood leaves the image: the same bits as the formula written out, at any angle, scale and place
    (partly or wholly off the image)."""
    from edge.align import _sample_bilinear

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    steps = np.arange(40.0)
    for _ in range(100):
        angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.2, 3.0)
        x0, y0 = rng.uniform(-60, 160), rng.uniform(-60, 130)
        xs = x0 + scale * (np.cos(angle) * steps - np.sin(angle) * steps[:, None])
        ys = y0 + scale * (np.sin(angle) * steps + np.cos(angle) * steps[:, None])
        left, top = np.floor(xs), np.floor(ys)
        inside = (left >= 0) & (top >= 0) & (left + 1 < 120) & (top + 1 < 90)
        xi, yi = np.where(inside, left, 0).astype(int), np.where(inside, top, 0).astype(int)
        fx, fy = (xs - left)[..., None], (ys - top)[..., None]
        tl, tr = image[yi, xi].astype(np.float64), image[yi, xi + 1].astype(np.float64)
        bl, br = image[yi + 1, xi].astype(np.float64), image[yi + 1, xi + 1].astype(np.float64)
        value = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
        expected = np.where(inside[..., None], np.clip(value, 0, 255), 0).astype(np.uint8)
        assert np.array_equal(_sample_bilinear(image, xs, ys), expected)
        grey = image[..., 1].copy()
        assert np.array_equal(_sample_bilinear(grey, xs, ys), expected[..., 1])
