"""Embedder: unit vectors, batching, backends agreeing, mirror averaging and the store fingerprint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.align import mirror_chip
from edge.config import Config, EmbedderConfig
from edge.embed import chips_to_batch, create_embedder, fingerprint_of, model_fingerprint
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


# ---- the embedder's graph optimised once for this machine (`make models`) ------------------------------------


@pytest.fixture
def model_copy(models_dir, tmp_path):
    """The verified embedder model in a folder of its own, with its sha256."""
    import shutil

    from edge.embed import ONNX_FILE
    from engines.fetch import sha256_file

    path = tmp_path / ONNX_FILE
    shutil.copyfile(models_dir / ONNX_FILE, path)
    return path, sha256_file(path)


def test_the_graph_optimised_for_this_machine_gives_the_same_embeddings(model_copy, chips):
    from edge.backends.onnxruntime import OnnxRuntimeBackend, optimize_for_host

    path, sha = model_copy
    batch = chips_to_batch(chips)
    plain = OnnxRuntimeBackend(onnx_path=path, threads=1, source_sha256=sha).infer(batch)
    prepared_path = optimize_for_host(path, sha)
    assert prepared_path.parent == path.parent and sha not in prepared_path.name  # a signature, not the sha itself
    assert oct(prepared_path.stat().st_mode & 0o777) == "0o644"
    prepared = OnnxRuntimeBackend(onnx_path=path, threads=1, source_sha256=sha)
    np.testing.assert_array_equal(prepared.infer(batch), plain)


def test_a_damaged_optimised_graph_falls_back_to_the_verified_model(model_copy, chips, caplog):
    from edge.backends.onnxruntime import OnnxRuntimeBackend, optimize_for_host

    path, sha = model_copy
    batch = chips_to_batch(chips)
    expected = OnnxRuntimeBackend(onnx_path=path, threads=1).infer(batch)
    optimize_for_host(path, sha).write_bytes(b"\x08\x07 not a model")
    np.testing.assert_array_equal(OnnxRuntimeBackend(onnx_path=path, threads=1, source_sha256=sha).infer(batch), expected)
    assert "event=optimized_model_unusable" in caplog.text and "make models" in caplog.text


def test_another_model_or_machine_does_not_use_the_optimised_graph(model_copy):
    from edge.backends.onnxruntime import host_optimized_path

    path, sha = model_copy
    assert host_optimized_path(path, sha) != host_optimized_path(path, "0" * 64)
    assert host_optimized_path(path, sha) == host_optimized_path(path, sha)


def test_make_models_prepares_the_graph_and_removes_stale_copies(model_copy):
    from edge.backends.onnxruntime import host_optimized_path
    from edge.embed import ONNX_FILE
    from engines.fetch import prepare_for_host

    path, sha = model_copy
    stale = path.with_name(f"{path.stem}.host-0123456789abcdef.onnx")
    stale.write_bytes(b"made for another machine")
    made = prepare_for_host(path.parent, {ONNX_FILE: {"sha256": sha}})
    assert made == host_optimized_path(path, sha) and made.stat().st_size > 1_000_000
    assert not stale.exists()
    before = made.stat().st_mtime_ns
    assert prepare_for_host(path.parent, {ONNX_FILE: {"sha256": sha}}) == made and made.stat().st_mtime_ns == before


def test_the_optimised_graph_holds_less_memory(model_copy):
    """Measured in a fresh process each (RSS only grows in one): optimising at start-up keeps the original weights
    beside the re-laid-out ones; the embedder is 22 MB of weights, so the prepared graph must save well over 10 MB."""
    import subprocess
    import sys

    from edge.backends.onnxruntime import optimize_for_host

    path, sha = model_copy
    probe = ("import sys; from pathlib import Path; from edge.backends.onnxruntime import OnnxRuntimeBackend\n"
             "def rss(): return int(Path('/proc/self/status').read_text().split('VmRSS:')[1].split()[0]) / 1024\n"
             "before = rss(); OnnxRuntimeBackend(onnx_path=Path(sys.argv[1]), threads=1, source_sha256=sys.argv[2])\n"
             "print(rss() - before)")

    def session_mib() -> float:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-c", probe, str(path), sha], cwd=root, capture_output=True, text=True,
                             check=True)
        return float(out.stdout)

    plain = session_mib()
    optimize_for_host(path, sha)
    assert session_mib() < plain - 10
