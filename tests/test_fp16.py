"""FP16 on CPU: the FP16 graph TensorRT builds from, and whether the network survives FP16 storage at all.

No GPU is needed: `to_fp16` is what `make engine` parses into a strongly typed FP16 engine, and `round_to_fp16`
rounds every weight and activation through float16 exactly where an FP16 engine stores them. The GPU tests
(test_tensorrt.py) hold the real engine to the same limits.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import pairs_accuracy

from edge.backends.onnxruntime import OnnxRuntimeBackend
from edge.embed import ONNX_FILE, chips_to_batch
from engines import build_trt
from engines.fetch import sha256_file
from engines.onnx_fp16 import FP16_MAX, exact_session, float16_initializers, round_to_fp16, to_fp16

COSINE_MIN = 0.9995  # the TensorRT issue's limit for FP16 against ONNX FP32, face by face
FACES = 24  # "every face from ≥ 20 real photos"
MAX_ACCURACY_DROP_PP = 0.5
RANGE_HEADROOM = 64  # the largest activation must stay this many times below float16's largest value


@pytest.fixture(scope="module")
def fp32_model(models_dir) -> onnx.ModelProto:
    return onnx.load(str(models_dir / ONNX_FILE))


@pytest.fixture(scope="module")
def fp16_model(fp32_model) -> onnx.ModelProto:
    return to_fp16(fp32_model)


@pytest.fixture(scope="module")
def faces(pair_chips) -> np.ndarray:
    """FACES chips, one per photo, from different photos of pairs/."""
    _, chips = pair_chips
    assert len(chips) >= FACES
    return chips_to_batch(np.stack(list(chips.values())[:FACES]))


class SessionBackend:
    """An embedder backend over an in-memory ONNX Runtime session (name, infer, close)."""

    name = "onnxruntime-fp16-check"

    def __init__(self, session) -> None:
        self.session = session

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["embeddings"], {"chips": x})[0]

    def close(self) -> None:
        self.session = None


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp16_graph_stores_float16_and_keeps_float32_io(fp32_model, fp16_model, tmp_path):
    fp16_weights, fp32_weights = float16_initializers(fp16_model)
    assert fp32_weights == 0 and fp16_weights == float16_initializers(fp32_model)[1] > 50
    ops = [node.op_type for node in fp16_model.graph.node]
    assert ops.count("Cast") == 2 and len(ops) == len(fp32_model.graph.node) + 2
    path = tmp_path / "fp16.onnx"
    onnx.save(fp16_model, str(path))
    # the builder's own graph check: chips [batch,3,150,150] float32 → embeddings [batch,128] float32, dynamic batch
    assert build_trt.checked_onnx(path)[1].startswith("chips [")
    assert path.stat().st_size < 0.55 * sum(init.ByteSize() for init in fp32_model.graph.initializer)


def test_fp16_graph_is_the_same_bytes_every_time(fp32_model, fp16_model):
    again = to_fp16(fp32_model)
    assert again.SerializeToString() == fp16_model.SerializeToString()


def test_activations_stay_far_inside_float16_range(fp32_model, faces):
    exposed = exact_session(round_to_fp16(fp32_model, expose=True))
    largest = max(float(np.abs(out).max()) for out in exposed.run(None, {"chips": faces}))
    print(f"\nlargest |activation| on {len(faces)} faces: {largest:.1f} (float16 max {FP16_MAX:.0f})")
    assert np.isfinite(largest) and largest * RANGE_HEADROOM < FP16_MAX


@pytest.mark.parametrize("form", ["fp16 graph", "fp16 storage"])
def test_fp16_embeddings_match_fp32_face_by_face(models_dir, fp32_model, fp16_model, faces, form):
    reference = OnnxRuntimeBackend(onnx_path=models_dir / ONNX_FILE, threads=2).infer(faces)
    session = exact_session(fp16_model if form == "fp16 graph" else round_to_fp16(fp32_model))
    ours = session.run(None, {"chips": faces})[0]
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (FACES, 128)
    cosine = cosines(ours, reference)
    print(f"\n{form}: cosine vs fp32 on {FACES} faces min {cosine.min():.7f}, mean {cosine.mean():.7f}")
    assert cosine.min() >= COSINE_MIN


def test_fp16_storage_keeps_pairs_accuracy(models_dir, fp32_model, pair_chips):
    onnx_sha = sha256_file(models_dir / ONNX_FILE)
    fp32 = pairs_accuracy(OnnxRuntimeBackend(onnx_path=models_dir / ONNX_FILE, threads=2), pair_chips, onnx_sha)
    fp16 = pairs_accuracy(SessionBackend(exact_session(round_to_fp16(fp32_model))), pair_chips, onnx_sha)
    print(f"\nmaster.csv accuracy: fp32 {fp32:.2%}, fp16 storage {fp16:.2%}")
    assert fp32 >= 0.99
    assert abs(fp16 - fp32) * 100 <= MAX_ACCURACY_DROP_PP
