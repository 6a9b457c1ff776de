"""engines.dlib_serial / engines.sp_to_npz (the .dat → .npz conversion) and edge.landmarks (the predictor),
checked against dlib itself on real photos."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edge.errors import InputError
from edge.landmarks import LandmarkPredictor
from engines import sp_to_npz
from engines.dlib_serial import DlibFormatError, DlibReader

NPZ = "shape_predictor_5_face_landmarks.npz"
DAT = "shape_predictor_5_face_landmarks.dat"
LEVELS, TREES, SPLITS, FEATURES, PARTS = 15, 500, 15, 800, 5
DETECT_SIDE_PX = 640  # HOG runs on a downscaled copy (fast); landmarks run on the full-size photo
PERTURBATIONS = ((0.1, 0.0, 1.0), (-0.1, 0.1, 1.0), (0.0, -0.1, 1.1), (0.05, 0.0, 0.9))  # dx, dy per side; scale
MAX_MEAN_ERROR_PX = 0.5
# dlib-bin matches to the pixel on every box here; a 0.001 px slip in feature sampling drops this to ~40 %.
MIN_IDENTICAL_BOXES = 0.95
MIN_PHOTOS = 20


@pytest.fixture(scope="module")
def npz_path(models_dir: Path) -> Path:
    return models_dir / NPZ


@pytest.fixture(scope="module")
def predictor(npz_path: Path) -> LandmarkPredictor:
    return LandmarkPredictor(npz_path=npz_path)


# --- serialisation primitives -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "value"), [(b"\x01\x00", 0), (b"\x02\xf4\x01", 500), (b"\x81\x0a", -10), (b"\x01\xff", 255)]
)
def test_reader_integers(data: bytes, value: int) -> None:
    reader = DlibReader(data)
    assert reader.read_int() == value
    assert reader.remaining == 0


def test_reader_rejects_negative_unsigned_oversized_and_truncated_integers() -> None:
    with pytest.raises(DlibFormatError, match="control byte"):
        DlibReader(b"\x81\x0a").read_uint()
    with pytest.raises(DlibFormatError, match="control byte"):
        DlibReader(b"\x03\x00\x00\x01").read_int(2)
    with pytest.raises(DlibFormatError, match="truncated"):
        DlibReader(b"\x02\xf4").read_int()
    with pytest.raises(DlibFormatError, match="does not fit"):
        DlibReader(b"\x01\xff").read_int(1)


def test_reader_floats_mantissa_first_and_special_exponents() -> None:
    # 3 * 2**-1, then -5 * 2**2, then the +inf / -inf / NaN exponent codes 32000..32002 (0x7d00..0x7d02).
    data = b"\x01\x03\x81\x01" + b"\x81\x05\x01\x02" + b"\x01\x00\x02\x00\x7d" + b"\x01\x00\x02\x01\x7d"
    data += b"\x01\x00\x02\x02\x7d"
    reader = DlibReader(data)
    assert reader.read_float() == 1.5
    assert reader.read_float() == -20.0
    assert reader.read_float() == math.inf
    assert reader.read_float() == -math.inf
    assert math.isnan(reader.read_float())
    reader.expect_end()


def test_reader_bool_string_vector_matrix() -> None:
    # bool '1', string "ab", vector of 2 ints, matrix -2 x -1 (current format) holding 1.0 and 2.0.
    data = b"1" + b"\x01\x02ab" + b"\x01\x02\x01\x07\x01\x08"
    data += b"\x81\x02\x81\x01" + b"\x01\x01\x01\x00" + b"\x01\x02\x01\x00"
    reader = DlibReader(data)
    assert reader.read_bool() is True
    assert reader.read_string() == "ab"
    assert reader.read_vector(reader.read_int) == [7, 8]
    np.testing.assert_array_equal(reader.read_matrix(), [[1.0], [2.0]])
    reader.expect_end()
    with pytest.raises(DlibFormatError, match="bool"):
        DlibReader(b"x").read_bool()
    with pytest.raises(DlibFormatError, match="exceeds"):
        DlibReader(b"\x01\x09ab").read_string()


# --- the converted model ----------------------------------------------------------------------------------


def test_npz_holds_the_full_cascade(npz_path: Path) -> None:
    with np.load(npz_path) as npz:
        assert npz["initial_shape"].shape == (PARTS, 2)
        assert ((npz["initial_shape"] > 0) & (npz["initial_shape"] < 1)).all()
        for name in ("split_idx1", "split_idx2", "split_threshold"):
            assert npz[name].shape == (LEVELS, TREES, SPLITS)
        assert npz["leaf_values"].shape == (LEVELS, TREES, SPLITS + 1, PARTS, 2)
        assert npz["anchor_idx"].shape == (LEVELS, FEATURES)
        assert npz["deltas"].shape == (LEVELS, FEATURES, 2)
        assert int(npz["split_idx1"].max()) < FEATURES and int(npz["split_idx2"].max()) < FEATURES
        assert set(np.unique(npz["anchor_idx"])) == set(range(PARTS))
        assert npz["leaf_values"].dtype == np.float32 and npz["split_threshold"].dtype == np.float32


def test_convert_reproduces_the_npz(models_dir: Path, npz_path: Path, tmp_path: Path) -> None:
    dat = models_dir / DAT
    if not dat.exists():
        pytest.skip(f"{dat} not present")
    out = tmp_path / NPZ
    sp_to_npz.convert(dat, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [NPZ]  # the temporary file was renamed, not left
    with np.load(out) as fresh, np.load(npz_path) as shipped:
        assert sorted(fresh.files) == sorted(shipped.files)
        for name in fresh.files:
            np.testing.assert_array_equal(fresh[name], shipped[name], err_msg=name)
        again = tmp_path / "again.npz"
        sp_to_npz.write_npz({name: fresh[name] for name in fresh.files}, again)
    assert again.read_bytes() == out.read_bytes()  # fixed zip timestamps: reproducible sha256


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"\x01\x02\x81\x0a"])
def test_cli_bad_file_exits_2_with_one_line(content: bytes, tmp_path: Path, capsys) -> None:
    dat, npz = tmp_path / "bad.dat", tmp_path / "out.npz"
    dat.write_bytes(content)
    assert sp_to_npz.main([str(dat), str(npz)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(dat) in err
    assert not npz.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.dat"]


def test_cli_truncated_real_file_exits_2(models_dir: Path, tmp_path: Path, capsys) -> None:
    dat = models_dir / DAT
    if not dat.exists():
        pytest.skip(f"{dat} not present")
    cut = tmp_path / "cut.dat"
    cut.write_bytes(dat.read_bytes()[:20000])
    assert sp_to_npz.main([str(cut), str(tmp_path / "out.npz")]) == 2
    assert "truncated" in capsys.readouterr().err


# --- the predictor ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("boxes", [np.zeros((0, 4)), [], np.zeros((0, 4), np.int32)])
def test_no_boxes_gives_an_empty_array(predictor: LandmarkPredictor, boxes) -> None:
    out = predictor.predict(np.zeros((10, 10, 3), np.uint8), boxes)
    assert out.shape == (0, PARTS, 2) and out.dtype == np.float32


def test_rejects_unusable_inputs(predictor: LandmarkPredictor) -> None:
    box = np.array([[0, 0, 9, 9]])
    with pytest.raises(InputError, match="uint8"):
        predictor.predict(np.zeros((10, 10, 3), np.float32), box)
    with pytest.raises(InputError, match="alpha"):
        predictor.predict(np.zeros((10, 10, 4), np.uint8), box)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        predictor.predict(np.zeros((10, 10, 3), np.uint8), np.zeros((2, 3)))


def test_known_face_without_dlib(predictor: LandmarkPredictor, data_dir: Path) -> None:
    """dlib's own answer for one photo and box, recorded, so this runs where dlib is not installed."""
    import cv2

    image = cv2.imread(str(data_dir / "stills" / "obama-240p.jpg"))
    expected = [(239, 48), (230, 47), (206, 48), (215, 48), (222, 65)]
    points = predictor.predict(image, np.array([[190, 32, 252, 94]]))
    assert points.shape == (1, PARTS, 2) and points.dtype == np.float32
    np.testing.assert_array_equal(np.floor(points[0] + 0.5), expected)
    grey = image.astype(np.uint16).sum(axis=2) // 3  # the grey dlib samples from colour, given as grey
    np.testing.assert_array_equal(predictor.predict(grey.astype(np.uint8), np.array([[190, 32, 252, 94]])), points)


def _photos(data_dir: Path) -> list[Path]:
    people = sorted(data_dir.glob("people/**/*.jp*g"))
    stills = sorted(data_dir.glob("stills/*.jpg"))
    pairs = sorted(data_dir.glob("pairs/*.jpg"))
    return people + stills + pairs


def _test_boxes(detector, image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """HOG boxes (found on a downscaled copy, mapped back), each also shifted/scaled, plus one off the edge."""
    import cv2

    scale = min(1.0, DETECT_SIDE_PX / max(image.shape[:2]))
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    boxes = []
    for rect in detector(np.ascontiguousarray(small[..., ::-1]), 0):
        left, top, right, bottom = (round(v / scale) for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
        width, height = right - left, bottom - top
        boxes.append((left, top, right, bottom))
        for dx, dy, factor in PERTURBATIONS:
            cx, cy = (left + right) / 2 + dx * width, (top + bottom) / 2 + dy * height
            half_w, half_h = factor * width / 2, factor * height / 2
            boxes.append(tuple(round(v) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h)))
        boxes.append((-width // 3, top, width - width // 3, bottom))  # feature pixels fall outside the image
    return boxes


def test_matches_dlib_on_real_photos(predictor: LandmarkPredictor, data_dir: Path, dlib) -> None:
    import cv2
    face_recognition_models = pytest.importorskip("face_recognition_models")

    reference = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    detector = dlib.get_frontal_face_detector()
    errors, photos = [], 0
    for path in _photos(data_dir):
        bgr = cv2.imread(str(path))
        boxes = _test_boxes(detector, bgr)
        if not boxes:
            continue
        photos += 1
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        ours = predictor.predict(bgr, np.array(boxes))  # channel order does not matter: grey is the mean
        for box, points in zip(boxes, ours):
            shape = reference(rgb, dlib.rectangle(*box))
            theirs = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            errors.append(np.abs(np.floor(points.astype(np.float64) + 0.5) - theirs))
    errors = np.array(errors)
    identical = float((errors.max(axis=(1, 2)) == 0).mean())
    summary = (
        f"{len(errors)} boxes on {photos} photos: mean {errors.mean():.4f} px, max {errors.max():.0f} px, "
        f"{identical:.1%} of boxes identical"
    )
    print(summary)
    assert photos >= MIN_PHOTOS, summary
    assert errors.mean() <= MAX_MEAN_ERROR_PX, summary
    assert identical >= MIN_IDENTICAL_BOXES, summary
