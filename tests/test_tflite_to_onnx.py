"""engines.tflite_to_onnx: the FlatBuffer reader, TFLite's SAME padding, refusals, and the converted FaceMesh
against Google's TFLite interpreter on a real face (outputs recorded by tools/tflite_reference.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge.errors import ModelError
from engines.tflite_to_onnx import CONV_2D, build_graph, convert, read_tflite, same_pads

REFERENCE = Path(__file__).with_name("data") / "facemesh_reference.npz"
LANDMARKS_OUTPUT, FACE_OUTPUT = "conv2d_20", "conv2d_30"
LANDMARK_TOLERANCE_PX = 2e-3  # of a 192-px crop; float32 summation order differs between the two runtimes
LOGIT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def tflite_path(models_dir) -> Path:
    path = models_dir / "face_landmark.tflite"
    if not path.exists():
        pytest.skip(f"{path} absent: run `make models`")
    return path


def test_converted_facemesh_matches_the_tflite_interpreter(tflite_path, tmp_path):
    onnx_path = tmp_path / "face_landmark.onnx"
    convert(tflite_path, onnx_path)
    with np.load(REFERENCE) as reference:
        image, landmarks, face = reference["input"], reference[LANDMARKS_OUTPUT], reference[FACE_OUTPUT]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"input_1": image.astype(np.float32) / 255.0})))
    assert outputs[LANDMARKS_OUTPUT].shape == landmarks.shape == (1, 1, 1, 1404)
    assert np.abs(outputs[LANDMARKS_OUTPUT] - landmarks).max() < LANDMARK_TOLERANCE_PX
    assert abs(float(outputs[FACE_OUTPUT].ravel()[0]) - float(face.ravel()[0])) < LOGIT_TOLERANCE
    assert np.ptp(landmarks) > 100  # the reference is a face spread over the crop, not a degenerate output


def test_the_reader_sees_the_pinned_model(tflite_path):
    model = read_tflite(tflite_path.read_bytes())
    assert [model.tensors[i].shape for i in model.inputs] == [(1, 192, 192, 3)]
    assert [model.tensors[i].shape for i in model.outputs] == [(1, 1, 1, 1404), (1, 1, 1, 1)]
    first = model.operators[0]
    assert first.code == CONV_2D and model.tensors[first.inputs[1]].data.shape == (16, 3, 3, 3)


@pytest.mark.parametrize("size, kernel, stride, pads", [
    (192, 3, 2, (0, 1)),  # the odd pixel goes after
    (96, 3, 1, (1, 1)),
    (7, 2, 2, (0, 1)),
    (8, 2, 2, (0, 0)),
    (6, 5, 1, (2, 2)),
])
def test_same_padding_is_tflites(size, kernel, stride, pads):
    assert same_pads(size, kernel, stride) == pads
    before, after = pads
    assert -(-size // stride) == (size + before + after - kernel) // stride + 1  # SAME keeps ceil(size / stride)


def test_not_a_tflite_file_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a TensorFlow Lite model"):
        read_tflite(b"\x00" * 64)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x10\x00\x00\x00TFL3" + b"\xff" * 8)
    with pytest.raises(ModelError, match="bad.tflite: corrupt TensorFlow Lite model"):
        convert(bad, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_an_operator_it_does_not_know_is_refused_by_number(tflite_path):
    model = read_tflite(tflite_path.read_bytes())
    model.operators[5] = dataclasses.replace(model.operators[5], code=123)
    with pytest.raises(ModelError, match="unsupported operator 123"):
        build_graph(model)
