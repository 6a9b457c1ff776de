"""engines.tflite_to_onnx: the FlatBuffer reader, TFLite's SAME padding, refusals, and the converted FaceMesh and
iris models against Google's TFLite interpreter on a real face and eye (outputs recorded by
tools/tflite_reference.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge.errors import ModelError
from engines.tflite_to_onnx import CONV_2D, RESHAPE, build_graph, convert, read_tflite, same_pads

DATA = Path(__file__).with_name("data")
# model, its reference (tools/tflite_reference.py), tolerance per output: float32 sums in another order
REFERENCES = {
    "face_landmark": ("facemesh_reference.npz", {"conv2d_20": 2e-3, "conv2d_30": 1e-3}),  # 468 points; face logit
    "iris_landmark": ("iris_reference.npz", {"output_eyes_contours_and_brows": 1e-3, "output_iris": 1e-3}),
}


@pytest.fixture(scope="module")
def tflite_path(models_dir) -> Path:
    path = models_dir / "face_landmark.tflite"
    if not path.exists():
        pytest.skip(f"{path} absent: run `make models`")
    return path


@pytest.mark.parametrize("model", sorted(REFERENCES))
def test_converted_model_matches_the_tflite_interpreter(model, models_dir, tmp_path):
    tflite = models_dir / f"{model}.tflite"
    if not tflite.exists():
        pytest.skip(f"{tflite} absent: run `make models`")
    onnx_path = tmp_path / f"{model}.onnx"
    convert(tflite, onnx_path)
    reference_file, tolerances = REFERENCES[model]
    with np.load(DATA / reference_file) as reference:
        image, expected = reference["input"], {name: reference[name] for name in tolerances}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {session.get_inputs()[0].name: image.astype(np.float32) / 255.0})))
    assert outputs.keys() == expected.keys()
    for name, tolerance in tolerances.items():
        assert outputs[name].shape == expected[name].shape
        assert np.abs(outputs[name] - expected[name]).max() < tolerance, name
    first = next(iter(tolerances))
    assert np.ptp(expected[first]) > 30  # the reference is landmarks spread over the crop, not a degenerate output


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


def test_a_reshaped_tensor_feeding_another_operator_is_refused(models_dir):
    """After a Reshape the tensor is no longer a feature map: an operator reading it would get a wrong layout."""
    path = models_dir / "iris_landmark.tflite"
    if not path.exists():
        pytest.skip(f"{path} absent: run `make models`")
    model = read_tflite(path.read_bytes())
    reshape = next(i for i, op in enumerate(model.operators) if op.code == RESHAPE)
    follower = dataclasses.replace(model.operators[0], inputs=[model.operators[reshape].outputs[0]])
    model.operators.insert(reshape + 1, follower)
    with pytest.raises(ModelError, match="a reshaped tensor feeds another operator"):
        build_graph(model)


def test_an_operator_it_does_not_know_is_refused_by_number(tflite_path):
    model = read_tflite(tflite_path.read_bytes())
    model.operators[5] = dataclasses.replace(model.operators[5], code=123)
    with pytest.raises(ModelError, match="unsupported operator 123"):
        build_graph(model)
