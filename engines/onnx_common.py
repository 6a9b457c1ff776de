"""Pieces shared by the ONNX converters: the pinned ONNX versions, a small graph builder and the converters'
command-line wrapper."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge.errors import ModelError

OPSET = 17
IR_VERSION = 8  # that of ONNX 1.12, which introduced opset 17: readable by older runtimes (JetPack TensorRT)


class Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def run_conversion(convert: Callable[[], None], output: Path) -> int:
    """A converter's `main`: one `error:` line and exit 2 for a bad or missing input, one `ok` line otherwise."""
    try:
        convert()
    except (ModelError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ok  {output} ({output.stat().st_size} bytes)", file=sys.stderr)
    return 0
