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
from conftest import pairs_accuracy

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
    assert set(meta) == {*trt_backend.METADATA_KEYS, "built_from", "built_at", "build_s"}
    assert meta["built_from"] == build_trt.FP16_ONNX_FILE and "61 float16 weights, 0 float32, I/O float32" in err
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
FACES = 24  # the issue: every face from ≥ 20 real photos
MAX_ACCURACY_DROP_PP = 0.5
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
def test_engine_matches_onnxruntime_on_real_faces(built, models_dir, pair_chips):
    from edge.backends.onnxruntime import OnnxRuntimeBackend
    from edge.embed import chips_to_batch

    folder, meta = built
    batch = chips_to_batch(np.stack(list(pair_chips[1].values())[:FACES]))  # one face per photo
    reference = OnnxRuntimeBackend(onnx_path=models_dir / ONNX_FILE, threads=1)
    engine = trt_backend.TensorRTBackend(engine_path=trt_backend.engine_path_in(folder, meta["precision"]))
    try:
        assert engine.infer(batch[:1]).shape == (1, 128) and engine.infer(batch[:8]).shape == (8, 128)
        ours, theirs = engine.infer(batch[:11]), reference.infer(batch[:11])  # 11 > max batch 8: split in two
        assert ours.shape == theirs.shape == (11, 128) and ours.dtype == np.float32
        ours, theirs = engine.infer(batch), reference.infer(batch)
        cosine = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
        print(f"\ncosine vs onnxruntime ({meta['precision']}) on {len(batch)} faces: min {cosine.min():.6f}")
        assert cosine.min() >= COSINE_MIN
        for n in (1, 8):
            trt_ms, ort_ms = median_ms(engine.infer, batch[:n]), median_ms(reference.infer, batch[:n])
            print(f"batch {n}: tensorrt {trt_ms:.2f} ms, onnxruntime {ort_ms:.2f} ms ({ort_ms / trt_ms:.1f}x)")
    finally:
        engine.close()
        engine.close()
        reference.close()


@pytest.mark.gpu
def test_engine_keeps_pairs_accuracy(built, models_dir, pair_chips, onnx_sha):
    from edge.backends.onnxruntime import OnnxRuntimeBackend

    folder, meta = built
    engine = trt_backend.TensorRTBackend(engine_path=trt_backend.engine_path_in(folder, meta["precision"]))
    try:
        ours = pairs_accuracy(engine, pair_chips, onnx_sha)
    finally:
        engine.close()
    reference = pairs_accuracy(OnnxRuntimeBackend(onnx_path=models_dir / ONNX_FILE, threads=2), pair_chips, onnx_sha)
    print(f"\nmaster.csv accuracy: tensorrt {meta['precision']} {ours:.2%}, onnxruntime {reference:.2%}")
    assert abs(ours - reference) * 100 <= MAX_ACCURACY_DROP_PP


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


# --- build_engine's own steps, against a recording stand-in for the tensorrt module -----------------------------
# The real builder runs only on a GPU (below); this checks on CPU what build_engine itself decides and writes:
# which graph is parsed, with which network flags, the profile, the timing cache and the file order.


class RecordingTensorRT:
    """The slice of the tensorrt module that EngineBuilder calls, recording what it is asked to do."""

    class Logger:
        WARNING, INFO = "warning", "info"

        def __init__(self, level) -> None:
            self.level = level

    class MemoryPoolType:
        WORKSPACE = "workspace"

    def __init__(self, version: str, *, fast_fp16: bool | None = True, build_fails: bool = False) -> None:
        self.__version__ = version
        self.calls: dict = {"timing_cache_blobs": []}
        major = int(version.split(".")[0])
        creation = {"EXPLICIT_BATCH": 0, **({"STRONGLY_TYPED": 1} if major >= 10 else {})}
        self.NetworkDefinitionCreationFlag = type("NetworkDefinitionCreationFlag", (), creation)
        self.BuilderFlag = type("BuilderFlag", (), {} if major >= 11 else {"FP16": 0})  # 11 removed FP16
        trt = self

        class Config:
            def set_memory_pool_limit(self, pool, size) -> None:
                trt.calls["workspace"] = (pool, size)

            def add_optimization_profile(self, profile) -> None:
                trt.calls["profile"] = profile.shapes

            def set_flag(self, flag) -> None:
                trt.calls.setdefault("flags", []).append(flag)

            def create_timing_cache(self, blob: bytes):
                trt.calls["timing_cache_blobs"].append(bytes(blob))
                return type("Cache", (), {"serialize": lambda _self: b"cache:" + trt.__version__.encode()})()

            def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, name, low, opt, high) -> None:
                self.shapes = (name, low, opt, high)

        class Network:
            def __init__(self, flags: int) -> None:
                trt.calls["network_flags"] = flags

            def get_input(self, index: int):
                return type("Tensor", (), {"name": "chips", "shape": (-1, 3, 150, 150)})()

        class Builder:
            def __init__(self, logger) -> None:
                if fast_fp16 is not None:
                    self.platform_has_fast_fp16 = fast_fp16

            def create_builder_config(self):
                return Config()

            def create_network(self, flags: int):
                return Network(flags)

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return None if build_fails else b"engine built from " + trt.calls["parsed"].name.encode()

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                import onnx

                trt.calls["parsed"] = Path(path)
                trt.calls["parsed_weight_types"] = {i.data_type for i in onnx.load(path).graph.initializer}
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture()
def fake_trt(monkeypatch):
    """Install a RecordingTensorRT of the given version as `tensorrt`, with a GPU that build_engine believes in."""

    def install(version: str, **kwargs) -> RecordingTensorRT:
        trt = RecordingTensorRT(version, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        runtime = {**HERE, "tensorrt_version": version}
        monkeypatch.setattr(build_trt, "runtime_or_reason", lambda: (runtime, ""))
        return trt

    return install


FLOAT16, FLOAT = 10, 1  # onnx.TensorProto data types
INT64 = 7


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_fp16_build_parses_the_fp16_graph_strongly_typed(tmp_models, onnx_sha, fake_trt, version):
    trt = fake_trt(version, fast_fp16=None if version.startswith("11") else True)
    meta = build_trt.build_engine(tmp_models, build_trt.BuildSettings(precision="fp16", max_batch=8))
    assert trt.calls["parsed"] == tmp_models / build_trt.FP16_ONNX_FILE
    assert trt.calls["parsed_weight_types"] == {FLOAT16, INT64}  # every float weight is float16; Pad sizes stay int
    assert trt.calls["network_flags"] == 1 << 1 and "flags" not in trt.calls  # STRONGLY_TYPED, no weak-typing flag
    assert trt.calls["profile"] == ("chips", (1, 3, 150, 150), (4, 3, 150, 150), (8, 3, 150, 150))
    assert trt.calls["workspace"] == ("workspace", 1024 << 20)
    engine = trt_backend.engine_path_in(tmp_models, "fp16")
    assert engine.read_bytes() == f"engine built from {build_trt.FP16_ONNX_FILE}".encode()
    assert json.loads(trt_backend.metadata_path(engine).read_text()) == meta
    assert meta["precision"] == "fp16" and meta["built_from"] == build_trt.FP16_ONNX_FILE
    assert trt_backend.engine_problem(engine, onnx_sha256=onnx_sha, runtime={**HERE, "tensorrt_version": version}) is None
    assert (tmp_models / build_trt.TIMING_CACHE_FILE).read_bytes() == f"cache:{version}".encode()


def test_rebuild_reuses_the_timing_cache(tmp_models, fake_trt):
    assert fake_trt("10.3.0").calls["timing_cache_blobs"] == []
    build_trt.build_engine(tmp_models, build_trt.BuildSettings())
    trt = fake_trt("10.3.0")
    build_trt.build_engine(tmp_models, build_trt.BuildSettings())
    assert trt.calls["timing_cache_blobs"] == [b"cache:10.3.0"]


def test_gpu_without_fast_fp16_gets_an_fp32_engine_from_the_fp32_graph(tmp_models, fake_trt, capsys):
    trt = fake_trt("10.3.0", fast_fp16=False)
    meta = build_trt.build_engine(tmp_models, build_trt.BuildSettings(precision="fp16"))
    assert meta["precision"] == "fp32" and meta["built_from"] == ONNX_FILE
    assert trt.calls["parsed"] == tmp_models / ONNX_FILE and trt.calls["parsed_weight_types"] == {FLOAT, INT64}
    assert "this GPU has no fast FP16; building an fp32 engine instead" in capsys.readouterr().err
    assert trt_backend.engine_path_in(tmp_models, "fp32").exists()
    assert not trt_backend.engine_path_in(tmp_models, "fp16").exists()


def test_failed_build_leaves_the_earlier_engine_and_metadata(tmp_models, fake_trt, capsys):
    fake_trt("10.3.0")
    build_trt.build_engine(tmp_models, build_trt.BuildSettings())
    engine = trt_backend.engine_path_in(tmp_models, "fp16")
    before = engine.read_bytes(), trt_backend.metadata_path(engine).read_bytes()
    capsys.readouterr()
    fake_trt("10.3.0", build_fails=True)
    assert build_trt.main(["--models-dir", str(tmp_models)]) == 2
    out, err = capsys.readouterr()
    assert "error: TensorRT failed to build the engine" in err and len(err.strip().splitlines()) == 2
    assert (engine.read_bytes(), trt_backend.metadata_path(engine).read_bytes()) == before
