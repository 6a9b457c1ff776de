"""Convert a float TensorFlow Lite model (MediaPipe's FaceMesh and iris landmark models) to ONNX, without TensorFlow.

`python -m engines.tflite_to_onnx MODEL.tflite MODEL.onnx`. A .tflite file is a FlatBuffer (schema: TensorFlow's
`lite/schema/schema.fbs`); the few tables a float CNN needs (model, subgraph, tensor, operator, buffer and the
options of the operators below) are read here with `struct`, by the field numbers of that schema.

Operators: those the pinned models use, CONV_2D, DEPTHWISE_CONV_2D, MAX_POOL_2D, ADD, PRELU, PAD and RESHAPE (with
the fused activations NONE, RELU, RELU6). Anything else is refused with its number: the converter serves the
pinned models, it is not a general one. TFLite keeps feature maps NHWC and convolution weights OHWI (depthwise:
1HWC); the ONNX graph keeps the model's NHWC input and outputs (same names, shapes and float32 values), with one
Transpose to NCHW after the input, weights rearranged to OIHW, and a Transpose back before each output and each
Reshape (which reads the NHWC order). Padding `SAME` becomes the explicit pads TFLite computes (the odd pixel, if
any, after), since every shape is static.
"""
from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge.errors import ModelError
from engines.fetch import write_atomically
from engines.onnx_common import IR_VERSION, OPSET, Graph, run_conversion

FILE_IDENTIFIER = b"TFL3"
NHWC_TO_NCHW, NCHW_TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
OHWI_TO_OIHW = (0, 3, 1, 2)
DEPTHWISE_TO_OIHW = (3, 0, 1, 2)  # 1HWC -> C1HW: one filter per channel (groups = channels)

# BuiltinOperator, TensorType, Padding and ActivationFunctionType values of schema.fbs.
ADD, CONV_2D, DEPTHWISE_CONV_2D, MAX_POOL_2D, RESHAPE, PAD, PRELU = 0, 3, 4, 17, 22, 34, 54
DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
PADDING_SAME = 0
ACTIVATION_NONE, ACTIVATION_RELU, ACTIVATION_RELU6 = 0, 1, 3


# ---- FlatBuffer reading ------------------------------------------------------------------------------------


class Table:
    """One FlatBuffer table: fields are read by their number in the schema (0-based), absent ones give defaults."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_len = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, number: int) -> int | None:
        slot = 4 + 2 * number
        if slot >= self.vtable_len:
            return None
        offset = struct.unpack_from("<H", self.buf, self.vtable + slot)[0]
        return self.pos + offset if offset else None

    def scalar(self, number: int, fmt: str, default=0):
        at = self._field(number)
        return default if at is None else struct.unpack_from("<" + fmt, self.buf, at)[0]

    def _target(self, at: int) -> int:
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def table(self, number: int) -> Table | None:
        at = self._field(number)
        return None if at is None else Table(self.buf, self._target(at))

    def _vector(self, number: int) -> tuple[int, int]:
        """(start, length) of a vector field; (0, 0) when absent."""
        at = self._field(number)
        if at is None:
            return 0, 0
        start = self._target(at)
        return start + 4, struct.unpack_from("<I", self.buf, start)[0]

    def tables(self, number: int) -> list[Table]:
        start, length = self._vector(number)
        return [Table(self.buf, self._target(start + 4 * i)) for i in range(length)]

    def array(self, number: int, dtype) -> np.ndarray:
        start, length = self._vector(number)
        return np.frombuffer(self.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=length, offset=start)

    def string(self, number: int) -> str:
        start, length = self._vector(number)
        return self.buf[start:start + length].decode("utf-8", "replace")


@dataclass
class Tensor:
    name: str
    shape: tuple
    data: np.ndarray | None  # constant weights, else None


@dataclass
class Operator:
    code: int
    inputs: list[int]  # tensor indices; -1 is an omitted optional input
    outputs: list[int]
    options: Table | None


@dataclass
class Model:
    tensors: list[Tensor]
    operators: list[Operator]
    inputs: list[int]
    outputs: list[int]


def read_tflite(payload: bytes) -> Model:
    """The first subgraph of a .tflite file: its tensors (with constant data), operators, inputs and outputs."""
    if len(payload) < 8 or payload[4:8] != FILE_IDENTIFIER:
        raise ModelError("not a TensorFlow Lite model (no TFL3 identifier)")
    try:
        root = Table(payload, struct.unpack_from("<I", payload, 0)[0])
        codes = [max(code.scalar(0, "b"), code.scalar(3, "i")) for code in root.tables(1)]
        buffers = [buffer.array(0, np.uint8) for buffer in root.tables(4)]
        subgraphs = root.tables(2)
        if len(subgraphs) != 1:
            raise ModelError(f"expected one subgraph, found {len(subgraphs)}")
        graph = subgraphs[0]
        tensors = []
        for tensor in graph.tables(0):
            kind, data = tensor.scalar(1, "b"), buffers[tensor.scalar(2, "I")]
            if kind not in DTYPES:
                raise ModelError(f"tensor {tensor.string(3)!r} has unsupported type {kind}")
            shape = tuple(int(d) for d in tensor.array(0, np.int32))
            constant = data.view(DTYPES[kind]).reshape(shape).copy() if len(data) else None
            tensors.append(Tensor(tensor.string(3), shape, constant))
        operators = [Operator(codes[op.scalar(0, "I")], [int(i) for i in op.array(1, np.int32)],
                              [int(i) for i in op.array(2, np.int32)], op.table(4)) for op in graph.tables(3)]
    except (struct.error, IndexError, ValueError) as err:
        raise ModelError(f"corrupt TensorFlow Lite model ({err})") from None
    return Model(tensors, operators, [int(i) for i in graph.array(1, np.int32)],
                 [int(i) for i in graph.array(2, np.int32)])


# ---- graph ---------------------------------------------------------------------------------------------------


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite's SAME padding along one axis: (before, after), the odd pixel after."""
    span = (kernel - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def window_attrs(options: Table, kernel_hw: tuple[int, int], input_hw: tuple[int, int], strides_at: tuple[int, int],
                 dilations_at: tuple[int, int] | None) -> dict:
    """ONNX strides, dilations and explicit pads of a convolution or pooling window (option field numbers given)."""
    stride_w, stride_h = options.scalar(strides_at[0], "i", 1), options.scalar(strides_at[1], "i", 1)
    dilation_w, dilation_h = ((options.scalar(dilations_at[0], "i", 1), options.scalar(dilations_at[1], "i", 1))
                              if dilations_at else (1, 1))
    if options.scalar(0, "b") == PADDING_SAME:
        top, bottom = same_pads(input_hw[0], kernel_hw[0], stride_h, dilation_h)
        left, right = same_pads(input_hw[1], kernel_hw[1], stride_w, dilation_w)
    else:
        top = bottom = left = right = 0
    attrs = {"strides": [stride_h, stride_w], "pads": [top, left, bottom, right]}
    if dilations_at:
        attrs["dilations"] = [dilation_h, dilation_w]
    return attrs


def activation(graph: Graph, value: str, code: int) -> str:
    """A fused activation after an operator."""
    if code == ACTIVATION_NONE:
        return value
    if code == ACTIVATION_RELU:
        return graph.node("Relu", [value])
    if code == ACTIVATION_RELU6:
        return graph.node("Clip", [value, graph.const("zero", np.float32(0.0)), graph.const("six", np.float32(6.0))])
    raise ModelError(f"unsupported fused activation {code}")


def build_graph(model: Model) -> onnx.ModelProto:
    """The ONNX graph of a parsed model; every feature map is NCHW inside, NHWC at the input and outputs."""
    graph = Graph()
    values: dict[int, str] = {}  # tensor index -> ONNX value name (NCHW, except the outputs of a Reshape)
    flat: set[int] = set()  # tensor indices made by Reshape
    for index in model.inputs:
        values[index] = graph.node("Transpose", [model.tensors[index].name], perm=NHWC_TO_NCHW)
    for op in model.operators:
        if op.inputs[0] in flat:
            raise ModelError(f"{model.tensors[op.inputs[0]].name}: a reshaped tensor feeds another operator")
        tensors = [model.tensors[i] for i in op.inputs]
        out_tensor = model.tensors[op.outputs[0]]
        source = values[op.inputs[0]]
        if op.code in (CONV_2D, DEPTHWISE_CONV_2D):
            kernel, bias = tensors[1].data, tensors[2].data
            depthwise = op.code == DEPTHWISE_CONV_2D
            if depthwise and kernel.shape[3] != tensors[0].shape[3]:
                raise ModelError(f"{out_tensor.name}: depth multiplier other than 1")
            weights = kernel.transpose(DEPTHWISE_TO_OIHW if depthwise else OHWI_TO_OIHW)
            attrs = window_attrs(op.options, kernel.shape[1:3], tensors[0].shape[1:3], (1, 2),
                                 (5, 6) if depthwise else (4, 5))
            if depthwise:
                attrs["group"] = kernel.shape[3]
            conv = graph.node("Conv", [source, graph.const("w", np.ascontiguousarray(weights)), graph.const("b", bias)],
                              **attrs)
            value = activation(graph, conv, op.options.scalar(4 if depthwise else 3, "b"))
        elif op.code == MAX_POOL_2D:
            kernel_hw = (op.options.scalar(4, "i"), op.options.scalar(3, "i"))
            attrs = window_attrs(op.options, kernel_hw, tensors[0].shape[1:3], (1, 2), None)
            value = activation(graph, graph.node("MaxPool", [source], kernel_shape=list(kernel_hw), **attrs),
                               op.options.scalar(5, "b"))
        elif op.code == ADD:
            value = activation(graph, graph.node("Add", [source, values[op.inputs[1]]]),
                               op.options.scalar(0, "b") if op.options else ACTIVATION_NONE)
        elif op.code == PRELU:
            slope = tensors[1].data.reshape(-1, 1, 1).astype(np.float32)  # (1, 1, C) -> (C, 1, 1), broadcast on NCHW
            value = graph.node("PRelu", [source, graph.const("slope", slope)])
        elif op.code == PAD:
            before, after = tensors[1].data[:, 0], tensors[1].data[:, 1]  # per NHWC axis
            pads = np.concatenate([before[NHWC_TO_NCHW], after[NHWC_TO_NCHW]]).astype(np.int64)
            value = graph.node("Pad", [source, graph.const("pads", pads)])
        elif op.code == RESHAPE:  # of a feature map, in TFLite's NHWC order; the result is no longer NCHW
            nhwc = graph.node("Transpose", [source], perm=NCHW_TO_NHWC)
            value = graph.node("Reshape", [nhwc, graph.const("shape", np.array(out_tensor.shape, np.int64))])
            flat.add(op.outputs[0])
        else:
            raise ModelError(f"unsupported operator {op.code} (builtin code of schema.fbs) at {out_tensor.name}")
        values[op.outputs[0]] = value
    for index in model.outputs:
        if index in flat:
            graph.node("Identity", [values[index]], output=model.tensors[index].name)
        else:
            graph.node("Transpose", [values[index]], output=model.tensors[index].name, perm=NCHW_TO_NHWC)

    def info(index: int) -> onnx.ValueInfoProto:
        tensor = model.tensors[index]
        return helper.make_tensor_value_info(tensor.name, TensorProto.FLOAT, list(tensor.shape))

    onnx_graph = helper.make_graph(graph.nodes, "tflite", [info(i) for i in model.inputs],
                                   [info(i) for i in model.outputs], graph.initializers)
    result = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                               producer_name="engines.tflite_to_onnx")
    result.ir_version = IR_VERSION
    onnx.checker.check_model(result)
    return result


def convert(tflite_path: Path, onnx_path: Path) -> None:
    """Convert `tflite_path` to onnx_path, atomically."""
    tflite_path, onnx_path = Path(tflite_path), Path(onnx_path)
    if not tflite_path.is_file():
        raise ModelError(f"{tflite_path} not found: run `make models` to fetch it")
    try:
        model = read_tflite(tflite_path.read_bytes())
    except ModelError as err:
        raise ModelError(f"{tflite_path}: {err}") from None
    write_atomically(build_graph(model).SerializeToString(), onnx_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.tflite_to_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("tflite", type=Path, help="face_landmark.tflite or iris_landmark.tflite")
    parser.add_argument("onnx", type=Path, help="output .onnx file")
    args = parser.parse_args(argv)
    return run_conversion(lambda: convert(args.tflite, args.onnx), args.onnx)


if __name__ == "__main__":
    sys.exit(main())
