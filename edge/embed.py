"""Embedder: aligned chips → unit-length 128-D embeddings through a swappable backend (ONNX Runtime, OpenCV, TensorRT)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.align import mirror_chip
from edge.config import EmbedderConfig
from edge.errors import ModelError
from engines.fetch import sha256_file

ONNX_FILE = "dlib_face_recognition_resnet_model_v1.onnx"
CHIP_PX = 150
# Bump when anything between the aligned chip and the stored vector changes (alignment, normalisation):
# stores enrolled under another version must not be matched against new embeddings.
PREPROCESS_VERSION = "chip150-pad0.25-unit-v1"
MIRROR_TAG = "mirror-avg"


def chips_to_batch(chips_bgr: np.ndarray) -> np.ndarray:
    """(N, 150, 150, 3) BGR uint8 → (N, 3, 150, 150) float32 RGB, the graph's input layout."""
    return np.ascontiguousarray(chips_bgr[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length."""
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fingerprint_of(onnx_sha256: str, mirror_average: bool) -> str:
    """What a store is stamped with: embeddings are comparable only under the same model and preprocessing."""
    return f"{onnx_sha256}:{PREPROCESS_VERSION}" + (f"+{MIRROR_TAG}" if mirror_average else "")


def model_fingerprint(models_dir: Path, mirror_average: bool) -> str:
    """The fingerprint without loading a backend (for store commands that embed nothing)."""
    return fingerprint_of(sha256_file(onnx_path_in(models_dir)), mirror_average)


def store_fingerprint(config) -> str:
    """The fingerprint a store enrolled under this config must carry (edge.config.Config)."""
    return model_fingerprint(config.resolved_models_dir(), config.embedder.mirror_average)


class Embedder:
    """Batches chips through one backend; `fingerprint` identifies the model + preprocessing for the store."""

    def __init__(self, backend, *, onnx_sha256: str, max_batch: int = 8, mirror_average: bool = True) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.mirror_average = mirror_average
        self.fingerprint = fingerprint_of(onnx_sha256, mirror_average)

    @property
    def name(self) -> str:
        return self.backend.name

    def embed_raw(self, chips_bgr: np.ndarray) -> np.ndarray:
        """dlib's raw descriptors (not unit length) for (N, 150, 150, 3) BGR chips; (0, 128) for none."""
        if len(chips_bgr) == 0:
            return np.zeros((0, 128), np.float32)
        batch = chips_to_batch(chips_bgr)
        parts = [self.backend.infer(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def embed(self, chips_bgr: np.ndarray) -> np.ndarray:
        """Unit-length embeddings, compared by L2 distance against `match.threshold_l2`.

        With mirror averaging, each chip and its horizontal mirror go through the network in one batch and the
        result is unit(unit(e(chip)) + unit(e(mirror))): a cheap test-time augmentation that separates
        genuine from impostor pairs better than either alone (README, Accuracy).
        """
        if len(chips_bgr) == 0:
            return np.zeros((0, 128), np.float32)
        if not self.mirror_average:
            return unit(self.embed_raw(chips_bgr))
        both = unit(self.embed_raw(np.concatenate([chips_bgr, mirror_chip(chips_bgr)])))
        count = len(chips_bgr)
        return unit(both[:count] + both[count:])

    def close(self) -> None:
        self.backend.close()


def onnx_path_in(models_dir: Path) -> Path:
    path = Path(models_dir) / ONNX_FILE
    if not path.exists():
        raise ModelError(f"embedding model {path} missing: run `make models`")
    return path


def create_embedder(config: EmbedderConfig, models_dir: Path) -> Embedder:
    """The configured backend; `auto` prefers a matching TensorRT engine and falls back to ONNX Runtime."""
    onnx_path = onnx_path_in(models_dir)
    onnx_sha = sha256_file(onnx_path)
    backend_name = config.backend
    if backend_name in ("auto", "tensorrt"):
        # Imports no TensorRT/CUDA unless an engine file exists; `tensorrt` raises where `auto` falls back.
        from edge.backends.tensorrt import open_matching_engine

        engine = open_matching_engine(models_dir, onnx_sha256=onnx_sha, required=backend_name == "tensorrt")
        if engine is not None:
            return Embedder(engine, onnx_sha256=onnx_sha, max_batch=config.max_batch, mirror_average=config.mirror_average)
    if backend_name == "opencv":
        from edge.backends.opencv import OpenCVBackend

        backend = OpenCVBackend(onnx_path=onnx_path, threads=config.threads)
    else:
        from edge.backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(onnx_path=onnx_path, threads=config.threads, source_sha256=onnx_sha)
    return Embedder(backend, onnx_sha256=onnx_sha, max_batch=config.max_batch, mirror_average=config.mirror_average)
