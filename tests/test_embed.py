"""Embedder: unit vectors, batching, backends agreeing, mirror averaging and the store fingerprint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.align import mirror_chip
from edge.config import Config, EmbedderConfig
from edge.embed import create_embedder, fingerprint_of, model_fingerprint
from edge.images import load_image
from edge.pipeline import Pipeline

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "photos"


@pytest.fixture(scope="module")
def chips(models_dir) -> np.ndarray:
    pipeline = Pipeline(Config())
    faces = [pipeline.analyze(load_image(SAMPLES / name))[0] for name in ("obama.jpg", "obama2.jpg", "biden.jpg")]
    return np.stack([f.chip for f in faces])


def test_embeddings_are_unit_length_and_batch_independent(models_dir, chips):
    embedder = create_embedder(EmbedderConfig(backend="onnxruntime"), models_dir)
    together = embedder.embed(chips)
    one_by_one = np.concatenate([embedder.embed(chips[i : i + 1]) for i in range(len(chips))])
    assert together.shape == (3, 128)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert np.abs(together - one_by_one).max() < 1e-5
    assert embedder.embed(chips[:0]).shape == (0, 128)


def test_same_person_closer_than_another(models_dir, chips):
    embedder = create_embedder(EmbedderConfig(), models_dir)
    e = embedder.embed(chips)
    same, other = np.linalg.norm(e[0] - e[1]), np.linalg.norm(e[0] - e[2])
    assert same < Config().match.threshold_l2 < other


def test_mirror_average_is_symmetric_and_differs_from_plain(models_dir, chips):
    mirrored = create_embedder(EmbedderConfig(mirror_average=True), models_dir)
    plain = create_embedder(EmbedderConfig(mirror_average=False), models_dir)
    # unit(e(c)) + unit(e(flip c)) does not change when the chip is flipped: a check that the flip is left-right.
    assert np.abs(mirrored.embed(chips) - mirrored.embed(mirror_chip(chips))).max() < 1e-5
    assert np.abs(plain.embed(chips) - plain.embed(mirror_chip(chips))).max() > 1e-2
    assert mirrored.fingerprint != plain.fingerprint


def test_opencv_backend_agrees_with_onnxruntime(models_dir, chips):
    ort_raw = create_embedder(EmbedderConfig(backend="onnxruntime"), models_dir).embed_raw(chips)
    cv_raw = create_embedder(EmbedderConfig(backend="opencv"), models_dir).embed_raw(chips)
    assert np.abs(ort_raw - cv_raw).max() < 1e-4


def test_fingerprint_names_model_and_preprocessing(models_dir):
    fingerprint = model_fingerprint(models_dir, True)
    assert fingerprint == create_embedder(EmbedderConfig(), models_dir).fingerprint
    sha, preprocessing = fingerprint.split(":", 1)
    assert len(sha) == 64 and "mirror" in preprocessing
    assert fingerprint_of("abc", False) != fingerprint_of("abc", True)
