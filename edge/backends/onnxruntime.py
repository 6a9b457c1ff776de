"""ONNX Runtime CPU backend (the default on Raspberry Pi and any machine without a matching TensorRT engine)."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import numpy as np

from edge.errors import first_line

log = logging.getLogger("edge.backends.onnxruntime")


def cpu_session(onnx_path: Path, threads: int, *, source_sha256: str | None = None):
    """An ONNX Runtime CPU session for small edge boards. Idle worker threads sleep instead of spinning: with
    spinning, two threads on 2 cores shared with the camera and the other model ran 1.3–2× slower than one;
    without it, two threads were 1.7× faster than one (detector 10.6 → 6.0 ms, 2 chips 5.4 → 3.3 ms).

    With `source_sha256` (the model's, as verified), the graph this machine's `make models` already optimised
    (host_optimized_path) is loaded as it is when present: optimising at start-up keeps the original weights
    beside the re-laid-out ones (embedder: 76 MB held instead of 29 MB, same speed)."""
    ort = _ort()
    options = _options(ort, threads)
    prepared = host_optimized_path(onnx_path, source_sha256) if source_sha256 else None
    if prepared is not None and prepared.exists():
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(prepared), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # a damaged copy: the verified model still works, only with more memory
            log.warning("event=optimized_model_unusable path=%s error=%s fix='make models'", prepared, first_line(err))
            options = _options(ort, threads)
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _ort():
    # ONNX Runtime's own telemetry (a database in ~/.cache and, seconds later, an upload to
    # mobile.events.data.microsoft.com) is off: a door controller talks to nobody it was not configured to. The
    # switch is read when the library loads, hence before the import.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    return ort


def _options(ort, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def host_signature(source_sha256: str) -> str:
    """What a fully optimised graph depends on: the source model, ONNX Runtime's version, the CPU architecture and
    its instruction-set flags (the NCHWc layout's block size follows AVX2 / AVX-512 / NEON)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    flags = next((line for line in lines if line.startswith(("flags", "Features"))), "")
    text = "|".join((source_sha256, _ort().__version__, platform.machine(), flags))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def host_optimized_path(onnx_path: Path, source_sha256: str) -> Path:
    """Where `make models` keeps onnx_path's graph optimised for this machine (ORT_ENABLE_ALL, then saved)."""
    return Path(onnx_path).with_name(f"{Path(onnx_path).stem}.host-{host_signature(source_sha256)}.onnx")


def optimize_for_host(onnx_path: Path, source_sha256: str) -> Path:
    """Write onnx_path's fully optimised graph for this machine beside it (atomically, mode 0644) and return its
    path. ONNX Runtime warns that such a graph only suits the machine it was made on: the name carries the
    machine's signature, and a machine with another one optimises the verified model at start-up instead."""
    ort = _ort()
    target = host_optimized_path(onnx_path, source_sha256)
    partial = target.with_name(target.name + ".partial")
    options = _options(ort, 1)
    options.optimized_model_filepath = str(partial)
    options.log_severity_level = 3  # the "hardware specific" warning is the point, not news
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    os.chmod(partial, 0o644)
    os.replace(partial, target)
    return target


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, *, onnx_path: Path, threads: int = 2, source_sha256: str | None = None) -> None:
        self._session = cpu_session(onnx_path, threads, source_sha256=source_sha256)
        self._input = self._session.get_inputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: x})[0]

    def close(self) -> None:
        self._session = None
