"""ONNX Runtime CPU backend (the default on Raspberry Pi and any machine without a matching TensorRT engine)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, *, onnx_path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: x})[0]

    def close(self) -> None:
        self._session = None
