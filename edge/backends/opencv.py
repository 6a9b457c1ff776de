"""OpenCV dnn backend on the same ONNX graph (no extra dependency; slower than ONNX Runtime on CPU)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class OpenCVBackend:
    name = "opencv"

    def __init__(self, *, onnx_path: Path, threads: int = 1) -> None:
        cv2.setNumThreads(threads)
        self._net = cv2.dnn.readNetFromONNX(str(onnx_path))

    def infer(self, x: np.ndarray) -> np.ndarray:
        self._net.setInput(x)
        return self._net.forward()

    def close(self) -> None:
        self._net = None
