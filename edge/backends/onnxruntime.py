"""ONNX Runtime CPU backend (the default on Raspberry Pi and any machine without a matching TensorRT engine)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def cpu_session(onnx_path: Path, threads: int):
    """An ONNX Runtime CPU session for small edge boards. Idle worker threads sleep instead of spinning: with
    spinning, two threads on 2 cores shared with the camera and the other model ran 1.3–2× slower than one;
    without it, two threads were 1.7× faster than one (detector 10.6 → 6.0 ms, 2 chips 5.4 → 3.3 ms)."""
    # ONNX Runtime's own telemetry (a database in ~/.cache and, seconds later, an upload to
    # mobile.events.data.microsoft.com) is off: a door controller talks to nobody it was not configured to. The
    # switch is read when the library loads, hence before the import.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, *, onnx_path: Path, threads: int = 2) -> None:
        self._session = cpu_session(onnx_path, threads)
        self._input = self._session.get_inputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: x})[0]

    def close(self) -> None:
        self._session = None
