"""TensorRT: engine metadata checks, `auto` fallback, the builder's CLI on CPU; engine parity where a GPU exists."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge.backends import tensorrt as trt_backend
from edge.config import EmbedderConfig
from edge.embed import ONNX_FILE, create_embedder
from edge.errors import ModelError
from engines import build_trt
from engines.fetch import sha256_file

ROOT = Path(__file__).resolve().parents[1]
HERE = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
SHA = "ab" * 32


def meta_for(onnx_sha256: str = SHA, **changes) -> dict:
    """Metadata as build_trt writes it, for an engine built here from onnx_sha256, with some fields changed."""
    meta = {**HERE, "onnx_sha256": onnx_sha256, "precision": "fp16", "max_batch": 8,
            "built_at": "2026-01-01T00:00:00+00:00", "build_s": 61.0}
    return {**meta, **changes}


@pytest.fixture()
def tmp_models(models_dir, tmp_path) -> Path:
    """A models folder holding only a link to the real ONNX (engines are added per test)."""
    (tmp_path / ONNX_FILE).symlink_to(models_dir / ONNX_FILE)
    return tmp_path


@pytest.fixture()
def onnx_sha(models_dir) -> str:
    return sha256_file(models_dir / ONNX_FILE)


def add_engine(models_dir: Path, precision: str, meta: dict | str | None) -> Path:
    """A placeholder engine file plus its metadata (a dict as JSON, a str written verbatim, None for no file)."""
    path = trt_backend.engine_path_in(models_dir, precision)
    path.write_bytes(b"not a real engine")
    if meta is not None:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        trt_backend.metadata_path(path).write_text(text)
    return path


class FakeEngine:
    """Stands in for TensorRTBackend where a test only checks which engine `auto` picks."""

    name = "tensorrt"

    def __init__(self, *, engine_path: Path, device: int = 0) -> None:
        self.engine_path = engine_path

    def close(self) -> None:
        pass


@pytest.fixture()
def gpu_here(monkeypatch):
    """Pretend TensorRT 10.3.0 runs on an Orin here, and that loading an engine works."""
    monkeypatch.setattr(trt_backend, "probe_runtime", lambda: dict(HERE))
    monkeypatch.setattr(trt_backend, "TensorRTBackend", FakeEngine)


# --- metadata ---------------------------------------------------------------------------------------------


def test_matching_metadata_has_no_problem():
    assert trt_backend.engine_metadata_problem(meta_for(), onnx_sha256=SHA, **HERE) is None


@pytest.mark.parametrize(
    "field, built, expected",
    [
        ("tensorrt_version", "10.7.0", "engine was built for TensorRT 10.7.0 but 10.3.0 is installed"),
        ("gpu_name", "NVIDIA GeForce RTX 4090", "engine was built on GPU 'NVIDIA GeForce RTX 4090' but this GPU is 'Orin'"),
        ("compute_capability", "8.9", "engine was built for compute capability 8.9 but this GPU has 8.7"),
        ("onnx_sha256", "cd" * 32, "engine was built from ONNX sha256 cdcdcdcdcdcd… but the model is abababababab…"),
    ],
)
def test_each_mismatch_is_named(field, built, expected):
    problem = trt_backend.engine_metadata_problem(meta_for(**{field: built}), onnx_sha256=SHA, **HERE)
    assert problem == expected


def test_several_mismatches_are_all_named():
    meta = meta_for(tensorrt_version="8.6.1", gpu_name="Xavier", compute_capability="7.2")
    problem = trt_backend.engine_metadata_problem(meta, onnx_sha256=SHA, **HERE)
    assert problem.count("engine was built") == 3 and "TensorRT 8.6.1" in problem and "'Xavier'" in problem


@pytest.mark.parametrize(
    "meta, expected",
    [
        (None, "its metadata file is missing"),
        ([1, 2], "its metadata is corrupt (not a JSON object)"),
        ({k: v for k, v in meta_for().items() if k != "onnx_sha256"}, "its metadata is corrupt (no onnx_sha256)"),
    ],
)
def test_missing_or_corrupt_metadata(meta, expected):
    assert trt_backend.engine_metadata_problem(meta, onnx_sha256=SHA, **HERE) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, "its metadata file is missing"),
        ('{"tensorrt_version": "10.3', "its metadata dlib_resnet_fp16.engine.json is corrupt (not valid JSON)"),
        (json.dumps(meta_for()), None),
    ],
)
def test_metadata_file_next_to_engine(tmp_path, text, expected):
    engine = add_engine(tmp_path, "fp16", text)
    assert trt_backend.engine_problem(engine, onnx_sha256=SHA, runtime=HERE) == expected


def test_probe_runtime_is_none_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what an uninstalled package looks like to find_spec
    assert trt_backend.probe_runtime() is None
    assert trt_backend.runtime_or_reason() == (None, "tensorrt is not installed")


# --- create_embedder ----------------------------------------------------------------------------------------


def test_auto_falls_back_to_onnxruntime_on_a_foreign_engine(tmp_models, onnx_sha, monkeypatch, caplog):
    add_engine(tmp_models, "fp16", meta_for(onnx_sha, tensorrt_version="10.3.0"))
    monkeypatch.setattr(trt_backend, "probe_runtime", lambda: {**HERE, "tensorrt_version": "10.7.0"})

    def never(**kwargs):
        raise AssertionError("a stale engine was loaded")

    monkeypatch.setattr(trt_backend, "TensorRTBackend", never)
    with caplog.at_level(logging.INFO, logger=trt_backend.__name__):
        embedder = create_embedder(EmbedderConfig(backend="auto"), tmp_models)
    assert embedder.name == "onnxruntime"
    assert embedder.embed(np.full((1, 150, 150, 3), 128, np.uint8)).shape == (1, 128)
    embedder.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "dlib_resnet_fp16.engine is stale (engine was built for TensorRT 10.3.0 but 10.7.0 is installed)" in message
    assert message.endswith("using onnxruntime — run `make engine` to rebuild")


def test_auto_warns_once_when_every_engine_is_stale(tmp_models, onnx_sha, gpu_here, caplog):
    add_engine(tmp_models, "fp16", meta_for(onnx_sha, gpu_name="Xavier"))
    add_engine(tmp_models, "fp32", None)
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        embedder = create_embedder(EmbedderConfig(backend="auto"), tmp_models)
    assert embedder.name == "onnxruntime"
    assert len(caplog.records) == 1 and "built on GPU 'Xavier'" in caplog.records[0].getMessage()


def test_auto_prefers_fp16_then_fp32(tmp_models, onnx_sha, gpu_here):
    add_engine(tmp_models, "fp32", meta_for(onnx_sha, precision="fp32"))
    embedder = create_embedder(EmbedderConfig(backend="auto"), tmp_models)
    assert embedder.name == "tensorrt" and embedder.backend.engine_path.name == "dlib_resnet_fp32.engine"
    add_engine(tmp_models, "fp16", meta_for(onnx_sha))
    embedder = create_embedder(EmbedderConfig(backend="auto"), tmp_models)
    assert embedder.backend.engine_path.name == "dlib_resnet_fp16.engine"


def test_auto_skips_a_stale_fp16_for_a_matching_fp32(tmp_models, onnx_sha, gpu_here, caplog):
    add_engine(tmp_models, "fp16", meta_for(onnx_sha, tensorrt_version="10.0.1"))
    add_engine(tmp_models, "fp32", meta_for(onnx_sha, precision="fp32"))
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        embedder = create_embedder(EmbedderConfig(backend="auto"), tmp_models)
    assert embedder.backend.engine_path.name == "dlib_resnet_fp32.engine"
    assert caplog.records == []


def test_auto_falls_back_when_a_matching_engine_will_not_load(tmp_models, onnx_sha, gpu_here, monkeypatch, caplog):
    add_engine(tmp_models, "fp16", meta_for(onnx_sha))

    def broken(**kwargs):
        raise RuntimeError("out of GPU memory")

    monkeypatch.setattr(trt_backend, "TensorRTBackend", broken)
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        embedder = create_embedder(EmbedderConfig(backend="auto"), tmp_models)
    assert embedder.name == "onnxruntime"
    assert len(caplog.records) == 1 and "could not be loaded (out of GPU memory)" in caplog.records[0].getMessage()


def test_auto_without_a_gpu_ignores_engines_quietly(tmp_models, onnx_sha, monkeypatch, caplog):
    add_engine(tmp_models, "fp16", meta_for(onnx_sha))
    monkeypatch.setattr(trt_backend, "probe_runtime", lambda: None)
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        embedder = create_embedder(EmbedderConfig(backend="auto"), tmp_models)
    assert embedder.name == "onnxruntime" and caplog.records == []


def test_tensorrt_backend_without_engine_says_make_engine(tmp_models):
    with pytest.raises(ModelError, match=r"^no TensorRT engine in .*: run `make engine` on this device$"):
        create_embedder(EmbedderConfig(backend="tensorrt"), tmp_models)


def test_tensorrt_backend_with_stale_engine_says_make_engine(tmp_models, onnx_sha, gpu_here):
    add_engine(tmp_models, "fp16", meta_for(onnx_sha, compute_capability="7.2"))
    with pytest.raises(ModelError, match=r"is stale \(engine was built for compute capability 7.2 .*run `make engine`"):
        create_embedder(EmbedderConfig(backend="tensorrt"), tmp_models)


def test_tensorrt_backend_without_tensorrt_names_the_fix(tmp_models, onnx_sha, monkeypatch):
    add_engine(tmp_models, "fp16", meta_for(onnx_sha))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_backend, "probe_runtime", lambda: None)
    with pytest.raises(ModelError, match=r"backend is tensorrt but tensorrt is not installed: .*TENSORRT.md"):
        create_embedder(EmbedderConfig(backend="tensorrt"), tmp_models)


def test_cpu_path_never_imports_tensorrt_or_pycuda(tmp_models):
    """In a fresh interpreter: no engine file → neither tensorrt nor pycuda is imported, GPU or not."""
    script = (
        "import json, sys\n"
        "from edge.config import EmbedderConfig\n"
        "from edge.embed import create_embedder\n"
        f"embedder = create_embedder(EmbedderConfig(backend='auto'), {str(tmp_models)!r})\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'pycuda'))\n"
        "print(json.dumps({'backend': embedder.name, 'loaded': loaded}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"backend": "onnxruntime", "loaded": []}


# --- engines.build_trt on CPU --------------------------------------------------------------------------------


def test_dry_run_checks_the_real_onnx_and_prints_the_plan(models_dir, onnx_sha, capsys):
    assert build_trt.main(["--dry-run", "--models-dir", str(models_dir)]) == 0
    out, err = capsys.readouterr()
    meta = json.loads(out)
    assert meta["onnx_sha256"] == onnx_sha and meta["precision"] == "fp16" and meta["max_batch"] == 8
    assert set(meta) == {*trt_backend.METADATA_KEYS, "built_at", "build_s"}
    assert "chips [" in err and "3, 150, 150] float32 → embeddings [" in err and "checker passed" in err
    assert "batch min/opt/max 1/4/8" in err and "1024 MiB" in err
    assert str(models_dir / "dlib_resnet_fp16.engine.json") in err


def test_dry_run_fp32_small_batch(models_dir, capsys):
    argv = ["--dry-run", "--models-dir", str(models_dir), "--precision", "fp32", "--max-batch", "2", "--workspace-mib", "256"]
    assert build_trt.main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["precision"] == "fp32" and json.loads(out)["max_batch"] == 2
    assert "batch min/opt/max 1/2/2" in err and "256 MiB" in err and "dlib_resnet_fp32.engine" in err


def test_dry_run_as_a_module_prints_the_plan():
    proc = subprocess.run(
        [sys.executable, "-m", "engines.build_trt", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "batch min/opt/max 1/4/8" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["precision"] == "fp16"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--max-batch", "0"], "--max-batch 0 gives batch profile 1/0/0"),
        (["--max-batch", "65"], "need 1 ≤ min ≤ opt ≤ max ≤ 64"),
        (["--workspace-mib", "0"], "--workspace-mib must be > 0, not 0"),
    ],
)
def test_dry_run_refuses_bad_settings(models_dir, capsys, args, expected):
    assert build_trt.main(["--dry-run", "--models-dir", str(models_dir), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and expected in err


def tiny_onnx(path: Path, *, input_name="chips", batch="batch", chip=(3, 150, 150), out_dim=128) -> Path:
    """A one-node graph with the given I/O declaration (enough for the I/O checks, not for inference)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", [input_name], ["embeddings"])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, *chip])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [batch, out_dim])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"input_name": "data"}, "inputs are ['data'], expected ['chips']"),
        ({"batch": 1}, "input chips has a fixed batch of 1; the engine needs a dynamic batch"),
        ({"chip": (3, 112, 112)}, "input chips has shape ['batch', 3, 112, 112], expected [batch, 3, 150, 150]"),
        ({"out_dim": 512}, "output embeddings has shape ['batch', 512], expected [batch, 128]"),
    ],
)
def test_dry_run_refuses_a_wrong_graph(tmp_path, capsys, kwargs, expected):
    tiny_onnx(tmp_path / ONNX_FILE, **kwargs)
    assert build_trt.main(["--dry-run", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err


def test_dry_run_refuses_a_corrupt_or_missing_onnx(tmp_path, capsys):
    assert build_trt.main(["--dry-run", "--models-dir", str(tmp_path)]) == 2
    assert "missing: run `make models`" in capsys.readouterr().err
    (tmp_path / ONNX_FILE).write_bytes(b"\x08\x07garbage" * 10)
    assert build_trt.main(["--dry-run", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not a valid ONNX model" in err


def test_build_without_tensorrt_is_one_line_exit_2(tmp_models, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert build_trt.main(["--models-dir", str(tmp_models)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1
    assert lines[0].startswith("error: TensorRT is not installed") and "Jetson notes (engines/TENSORRT.md)" in lines[0]
    assert not list(tmp_models.glob("*.engine*"))


# --- on a GPU ------------------------------------------------------------------------------------------------

COSINE_MIN = 0.9995
REPEATS = 20


@pytest.fixture(scope="module")
def gpu_runtime() -> dict:
    pytest.importorskip("tensorrt")
    pytest.importorskip("pycuda.driver")
    runtime, why = trt_backend.runtime_or_reason()
    if runtime is None:
        pytest.skip(f"no usable GPU: {why}")
    return runtime


@pytest.fixture(scope="module")
def built(gpu_runtime, models_dir, tmp_path_factory) -> tuple[Path, dict]:
    """An fp16 engine (fp32 where FP16 is unavailable) built from the real ONNX into a temporary models folder."""
    folder = tmp_path_factory.mktemp("engines")
    (folder / ONNX_FILE).symlink_to(models_dir / ONNX_FILE)
    meta = build_trt.build_engine(folder, build_trt.BuildSettings(precision="fp16", max_batch=8))
    print(f"\nbuilt {meta['precision']} engine for {meta['gpu_name']} in {meta['build_s']} s")
    return folder, meta


def face_chips(models_dir: Path, data_dir: Path, count: int) -> np.ndarray:
    """(count, 150, 150, 3) BGR chips of real faces, aligned by the project's pipeline (one face per photo)."""
    from edge.config import Config
    from edge.images import load_image
    from edge.pipeline import Pipeline

    pipeline = Pipeline(Config(models_dir=models_dir, embedder=EmbedderConfig(backend="onnxruntime")))
    chips: list[np.ndarray] = []
    try:
        for photo in sorted((data_dir / "pairs").glob("*.jpg")):
            chips += [face.chip for face in pipeline.analyze(load_image(photo))[:1]]
            if len(chips) >= count:
                break
    finally:
        pipeline.close()
    assert len(chips) >= count, f"found only {len(chips)} faces in {data_dir / 'pairs'}"
    return np.stack(chips[:count])


def median_ms(fn, batch: np.ndarray) -> float:
    fn(batch)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


@pytest.mark.gpu
def test_built_engine_metadata_matches_this_gpu(built, gpu_runtime, onnx_sha):
    folder, meta = built
    engine = trt_backend.engine_path_in(folder, meta["precision"])
    assert engine.stat().st_size > 1_000_000 and (folder / build_trt.TIMING_CACHE_FILE).exists()
    assert trt_backend.engine_problem(engine, onnx_sha256=onnx_sha, runtime=gpu_runtime) is None
    assert meta["max_batch"] == 8 and meta["onnx_sha256"] == onnx_sha and meta["build_s"] > 0


@pytest.mark.gpu
def test_engine_matches_onnxruntime_on_real_faces(built, models_dir, data_dir):
    from edge.backends.onnxruntime import OnnxRuntimeBackend
    from edge.embed import chips_to_batch

    folder, meta = built
    batch = chips_to_batch(face_chips(models_dir, data_dir, 11))
    reference = OnnxRuntimeBackend(onnx_path=models_dir / ONNX_FILE, threads=1)
    engine = trt_backend.TensorRTBackend(engine_path=trt_backend.engine_path_in(folder, meta["precision"]))
    try:
        assert engine.infer(batch[:1]).shape == (1, 128) and engine.infer(batch[:8]).shape == (8, 128)
        ours, theirs = engine.infer(batch), reference.infer(batch)  # 11 > max batch 8: split in two
        assert ours.shape == theirs.shape == (11, 128) and ours.dtype == np.float32
        cosine = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
        print(f"\ncosine vs onnxruntime ({meta['precision']}): min {cosine.min():.6f}")
        assert cosine.min() >= COSINE_MIN
        for n in (1, 8):
            trt_ms, ort_ms = median_ms(engine.infer, batch[:n]), median_ms(reference.infer, batch[:n])
            print(f"batch {n}: tensorrt {trt_ms:.2f} ms, onnxruntime {ort_ms:.2f} ms ({ort_ms / trt_ms:.1f}x)")
    finally:
        engine.close()
        engine.close()
        reference.close()


@pytest.mark.gpu
def test_auto_picks_the_built_engine(built, caplog):
    folder, meta = built
    with caplog.at_level(logging.WARNING):
        embedder = create_embedder(EmbedderConfig(backend="auto"), folder)
    try:
        assert embedder.name == "tensorrt" and caplog.records == []
        assert embedder.backend.engine_path.name == f"dlib_resnet_{meta['precision']}.engine"
        assert embedder.embed(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)
    finally:
        embedder.close()
