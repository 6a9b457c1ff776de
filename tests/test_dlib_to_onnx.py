"""engines.dlib_to_onnx: dlib's serialisation primitives, bad files refused, and parity with dlib on real faces."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge.errors import ModelError
from engines.dlib_serial import DlibFormatError, DlibReader
from engines.dlib_to_onnx import (
    ARCHITECTURE,
    MARKERS,
    Affine,
    Conv,
    Fc,
    convert,
    main,
    parse_resnet,
    read_alias,
    read_tensor,
)

DAT_FILE = "dlib_face_recognition_resnet_model_v1.dat"
ONNX_FILE = "dlib_face_recognition_resnet_model_v1.onnx"
PARITY_PHOTOS = [f"pairs/img{i}.jpg" for i in range(1, 31)]
MIN_FACES = 20
PARITY_MAX_ABS = 1e-4
CHIP_SIZE_PX, CHIP_PADDING = 150, 0.25
MEANS_RGB = (122.782, 117.001, 104.298)
PARAMETER_COUNT = 5_614_592


def encode_int(value: int) -> bytes:
    """dlib's integer encoding, to build synthetic records: control byte (sign, byte count), magnitude LE."""
    magnitude = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(magnitude) | (0x80 if value < 0 else 0)]) + magnitude


# ---- serialisation primitives ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [(b"\x01\x00", 0), (b"\x02\xf4\x01", 500), (b"\x81\x0a", -10)])
def test_integers_decode_as_the_notes_say(raw, value):
    reader = DlibReader(raw)
    assert reader.read_int() == value
    assert reader.remaining == 0
    assert encode_int(value) == raw


def test_float_is_mantissa_then_exponent():
    # 0.04f as stored in the model's loss record: mantissa 10737418, exponent -28.
    raw = bytes.fromhex("030ad7a3811c")
    assert DlibReader(raw).read_float() == 10737418 * 2.0**-28 == float(np.float32(0.04))
    assert DlibReader(encode_int(3) + encode_int(-1)).read_float() == 1.5
    assert DlibReader(encode_int(1) + encode_int(32000)).read_float() == math.inf


def test_tensor_is_shape_then_raw_float32():
    values = np.arange(6, dtype="<f4") - 2.5
    raw = b"".join(encode_int(v) for v in (2, 1, 2, 1, 3)) + values.tobytes()
    reader = DlibReader(raw)
    tensor = read_tensor(reader)
    assert tensor.shape == (1, 2, 1, 3)
    np.testing.assert_array_equal(tensor.reshape(-1), values)
    assert reader.remaining == 0


def test_alias_tensor_has_a_shape_and_no_data():
    raw = b"".join(encode_int(v) for v in (1, 32, 3, 7, 7))
    assert read_alias(DlibReader(raw)) == (32, 3, 7, 7)


def test_truncated_tensor_is_refused():
    raw = b"".join(encode_int(v) for v in (2, 1, 2, 1, 3)) + bytes(20)
    with pytest.raises(DlibFormatError, match="truncated"):
        read_tensor(DlibReader(raw))


# ---- bad files ---------------------------------------------------------------------------------------


def assert_refused(dat: Path, tmp_path: Path, capsys, match: str) -> None:
    """convert raises a ModelError naming the problem, main exits 2 with one line, nothing is written."""
    out = tmp_path / "out" / ONNX_FILE
    with pytest.raises(ModelError, match=match):
        convert(dat, out)
    assert main([str(dat), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_garbage_file_is_refused(tmp_path, capsys):
    dat = tmp_path / DAT_FILE
    dat.write_bytes(b"this is not a dlib model\n" * 40)
    assert_refused(dat, tmp_path, capsys, "not a valid dlib face recognition model")


def test_missing_file_is_refused(tmp_path, capsys):
    assert_refused(tmp_path / DAT_FILE, tmp_path, capsys, "cannot read")


@pytest.mark.parametrize("keep_fraction", [0.001, 0.5, 0.99999])
def test_truncated_model_is_refused(models_dir, tmp_path, capsys, keep_fraction):
    data = (models_dir / DAT_FILE).read_bytes()
    dat = tmp_path / DAT_FILE
    dat.write_bytes(data[: int(len(data) * keep_fraction)])
    assert_refused(dat, tmp_path, capsys, "truncated")


def test_trailing_bytes_are_refused(models_dir, tmp_path, capsys):
    dat = tmp_path / DAT_FILE
    dat.write_bytes((models_dir / DAT_FILE).read_bytes() + b"\x00")
    assert_refused(dat, tmp_path, capsys, "unexpected bytes")


# ---- the real model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def network(models_dir):
    return parse_resnet((models_dir / DAT_FILE).read_bytes())


def test_parsed_network_matches_the_notes(network):
    layers = [layer for op, layer in network.steps if op not in MARKERS]
    assert len(layers) == 108 and len(network.steps) - len(layers) == 22 == len(ARCHITECTURE) - 108
    assert network.size_px == CHIP_SIZE_PX
    assert network.means_rgb == pytest.approx(MEANS_RGB, abs=1e-4)
    arrays = [a for layer in layers if isinstance(layer, (Conv, Affine)) for a in vars(layer).values()
              if isinstance(a, np.ndarray)]
    fc = layers[-1]
    assert isinstance(fc, Fc) and fc.weights.shape == (256, 128)
    assert sum(a.size for a in arrays) + fc.weights.size == PARAMETER_COUNT
    convs = [layer for layer in layers if isinstance(layer, Conv)]
    assert convs[0].weights.shape == (32, 3, 7, 7) and convs[0].stride == (2, 2) and convs[0].pad == (0, 0)
    for conv in convs[1:]:
        assert conv.pad == ((1, 1) if conv.stride == (1, 1) else (0, 0))


def test_converted_graph_has_the_promised_interface(models_dir, tmp_path):
    out = tmp_path / "new" / ONNX_FILE
    convert(models_dir / DAT_FILE, out)
    assert [p.name for p in out.parent.iterdir()] == [ONNX_FILE]  # no temp file left behind
    model = onnx.load(out)
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (chips,), (embeddings,) = model.graph.input, model.graph.output
    assert (chips.name, dims(chips)) == ("chips", ["batch", 3, 150, 150])
    assert (embeddings.name, dims(embeddings)) == ("embeddings", ["batch", 128])
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Pad"] == 5 and ops["Conv"] == 29 and ops["Mul"] == 1  # affines folded into the convs
    means = next(i for i in model.graph.initializer if i.name.startswith("means_rgb"))
    assert onnx.numpy_helper.to_array(means).reshape(-1) == pytest.approx(MEANS_RGB, abs=1e-4)


# ---- parity with dlib --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chips_and_descriptors(dlib, data_dir):
    """dlib's own chips (HOG detector, 5-point landmarks, get_face_chip) and dlib's descriptors for them."""
    models = pytest.importorskip("face_recognition_models")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
    recogniser = dlib.face_recognition_model_v1(models.face_recognition_model_location())
    chips, photos = [], 0
    for name in PARITY_PHOTOS:
        rgb = dlib.load_rgb_image(str(data_dir / name))
        faces = [predictor(rgb, box) for box in detector(rgb, 0)]
        chips += [dlib.get_face_chip(rgb, shape, size=CHIP_SIZE_PX, padding=CHIP_PADDING) for shape in faces]
        photos += bool(faces)
    descriptors = np.array([recogniser.compute_face_descriptor(chip) for chip in chips])
    return np.stack(chips), descriptors, photos


def test_onnx_matches_dlib_on_real_faces(models_dir, chips_and_descriptors):
    ort = pytest.importorskip("onnxruntime")
    chips_rgb, expected, photos = chips_and_descriptors
    assert len(chips_rgb) >= MIN_FACES
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(models_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    batch = np.ascontiguousarray(chips_rgb.transpose(0, 3, 1, 2), dtype=np.float32)
    (embeddings,) = session.run(["embeddings"], {"chips": batch})
    max_abs = float(np.abs(embeddings - expected).max())
    print(f"dlib parity: max |delta| = {max_abs:.2e} over {len(batch)} faces from {photos} photos")
    assert max_abs <= PARITY_MAX_ABS
    norms = np.linalg.norm(embeddings, axis=1)
    assert np.all(np.abs(norms - 1.0) > 0.1), "the raw dlib descriptor is not unit length"
