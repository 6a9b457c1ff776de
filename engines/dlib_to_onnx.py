"""Convert dlib's 128-D face-recognition ResNet (dlib_face_recognition_resnet_model_v1.dat) to ONNX.

`python -m engines.dlib_to_onnx DAT ONNX`. The .dat is parsed with engines.dlib_serial; dlib is not needed.
File layout (dlib/dnn/core.h, serialised by an old dlib, so the old record versions):

    add_loss_layer version 1, then the loss record ("loss_metric_2", margin, distance threshold)
    130 wrapper versions, output end first: 1 for each of the 22 tag/skip markers, 2 for each of the 108
    layers except the first (the one on the input layer, a different add_layer specialisation), which is 3
    the input record ("input_rgb_image_sized", mean R, G, B, rows, cols)
    108 layer records in forward order; each is the layer's own fields, then three bools and three tensors
    (x_grad, cached_output, params_grad) that inference ignores; the first also ends with its sample
    expansion factor (1)

Tag ids are not stored, so the residual wiring comes from the network's definition in dlib's Python
binding (ARCHITECTURE below); the file is checked against it record by record. Conv weights are stored
(filters, in-channels, kh, kw), cross-correlation like ONNX, with the bias after them; affine layers are
batch-norm already folded (gamma, beta) and are folded here into the conv before them. A residual add makes
the element-wise largest shape and zero-pads the smaller input at the end (channels and, in the last two
levels, rows and columns too), so Pad nodes precede those Adds.

Graph: `chips` (N, 3, 150, 150) float32 RGB pixel values 0..255 -> `embeddings` (N, 128) float32, the raw
dlib descriptor (not unit length); the graph subtracts the file's channel means and divides by 256 itself.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge.errors import ModelError
from engines.dlib_serial import DlibReader, parse_model_file
from engines.fetch import write_atomically
from engines.onnx_common import IR_VERSION, OPSET, Graph, run_conversion

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "chips", "embeddings", "batch"
INPUT_CHANNELS = 3
PIXEL_SCALE = 1.0 / 256.0  # dlib's input layer: (pixel - mean) / 256, exact in float32

LOSS_LAYER_VERSION = 1
LAYER_VERSION = 2  # add_layer: its fields end with params_grad (version 1 lacked it)
INPUT_LAYER_VERSION = 3  # add_layer on the input layer: its fields end with the sample expansion factor
SAMPLE_EXPANSION_FACTOR = 1
MARKER_VERSION = 1  # add_tag_layer and add_skip_layer
TENSOR_VERSION, ALIAS_VERSION = 2, 1
LAYER_TAIL_BOOLS, LAYER_TAIL_TENSORS = 3, 3
CONV_MODE = 0  # affine_: one gamma/beta per channel (FC_MODE would be per element)
FC_NO_BIAS = 1
FLOAT32_BYTES = 4
LOSS_RECORD = "loss_metric_2"
INPUT_RECORD = "input_rgb_image_sized"

MARKERS = ("tag1", "tag2", "skip1")
RECORD_NAMES = {
    "con": "con_4",
    "affine": "affine_",
    "relu": "relu_",
    "max_pool": "max_pool_2",
    "avg_pool": "avg_pool_2",
    "add_prev1": "add_prev_",
    "add_prev2": "add_prev_",
    "fc": "fc_2",
}


def _residual(down: bool) -> list[str]:
    """dlib's ares (add_prev1 of the block and its input) or ares_down (add_prev2 of the block and a 2x2
    average pool of its input, reached through skip1), input to output."""
    block = ["tag1", "con", "affine", "relu", "con", "affine"]
    if down:
        return [*block, "tag2", "skip1", "avg_pool", "add_prev2", "relu"]
    return [*block, "add_prev1", "relu"]


# alevel4 .. alevel0 of face_recognition.cpp: whether each residual block down-samples.
LEVELS = ((False, False, False), (True, False, False, False), (True, False, False), (True, False, False), (True,))
ARCHITECTURE = tuple(
    ["con", "affine", "relu", "max_pool"]
    + [op for level in LEVELS for down in level for op in _residual(down)]
    + ["avg_pool", "fc"]
)


@dataclass(frozen=True)
class Conv:
    """Convolution: weights (filters, in-channels, kh, kw), bias (filters,), stride and padding (y, x)."""

    weights: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int]
    pad: tuple[int, int]


@dataclass(frozen=True)
class Affine:
    """Per-channel y = gamma * x + beta."""

    gamma: np.ndarray
    beta: np.ndarray


@dataclass(frozen=True)
class Pool:
    """Max or average pooling; a (0, 0) window means the whole map (global pooling)."""

    window: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]


@dataclass(frozen=True)
class Fc:
    """Fully connected without bias, weights (inputs, outputs) as stored: y = x @ weights."""

    weights: np.ndarray


Layer = Conv | Affine | Pool | Fc | None
Step = tuple[str, Layer]


@dataclass(frozen=True)
class DlibResNet:
    """What the converter needs from the file: input means and size, and the forward steps."""

    means_rgb: tuple[float, float, float]
    size_px: int
    steps: list[Step]


# ---- parsing -----------------------------------------------------------------------------------------


def _expect(reader: DlibReader, what: str, found: object, wanted: object) -> None:
    if found != wanted:
        raise reader.fail(f"{what} is {found!r}, expected {wanted!r}")


def _read_shape(reader: DlibReader) -> tuple[int, int, int, int]:
    """num_samples, k, nr, nc of a tensor; negative sizes mean corruption."""
    shape = tuple(reader.read_int() for _ in range(4))
    if min(shape) < 0:
        raise reader.fail(f"negative tensor size {shape}")
    return shape


def read_tensor(reader: DlibReader) -> np.ndarray:
    """A resizable_tensor: version 2, its shape, then raw little-endian float32 values."""
    _expect(reader, "tensor version", reader.read_int(4), TENSOR_VERSION)
    shape = _read_shape(reader)
    count = math.prod(shape)
    if count * FLOAT32_BYTES > reader.remaining:
        raise reader.fail(f"truncated: tensor {shape} needs {count * FLOAT32_BYTES} bytes")
    return np.frombuffer(reader.read_bytes(count * FLOAT32_BYTES), dtype="<f4").reshape(shape)


def read_alias(reader: DlibReader) -> tuple[int, int, int, int]:
    """An alias_tensor: version 1 and a shape, no data (it views part of a layer's params tensor)."""
    _expect(reader, "alias tensor version", reader.read_int(4), ALIAS_VERSION)
    return _read_shape(reader)


def _read_multipliers(reader: DlibReader) -> None:
    """Learning-rate and weight-decay multipliers (weights, bias): training-only doubles."""
    for _ in range(4):
        reader.read_float()


def _read_conv(reader: DlibReader) -> Conv:
    params = read_tensor(reader).reshape(-1)
    filters = reader.read_int()
    rows, cols = reader.read_int(), reader.read_int()
    stride = reader.read_int(4), reader.read_int(4)
    pad = reader.read_int(4), reader.read_int(4)
    weight_shape = read_alias(reader)
    bias_shape = read_alias(reader)
    _read_multipliers(reader)
    n, channels, kh, kw = weight_shape
    _expect(reader, "conv weights shape", weight_shape, (filters, channels, rows, cols))
    _expect(reader, "conv bias shape", bias_shape, (1, filters, 1, 1))
    _expect(reader, "conv parameter count", params.size, n * channels * kh * kw + filters)
    if min(filters, rows, cols, *stride) < 1 or min(pad) < 0:
        raise reader.fail(f"bad conv: {filters} filters of {rows}x{cols}, stride {stride}, padding {pad}")
    return Conv(params[: -filters].reshape(weight_shape), params[-filters:].copy(), stride, pad)


def _read_affine(reader: DlibReader) -> Affine:
    params = read_tensor(reader).reshape(-1)
    gamma_shape, beta_shape = read_alias(reader), read_alias(reader)
    _expect(reader, "affine mode", reader.read_int(4), CONV_MODE)
    channels = gamma_shape[1]
    _expect(reader, "affine gamma shape", gamma_shape, (1, channels, 1, 1))
    _expect(reader, "affine beta shape", beta_shape, gamma_shape)
    _expect(reader, "affine parameter count", params.size, 2 * channels)
    return Affine(params[:channels].copy(), params[channels:].copy())


def _read_pool(reader: DlibReader) -> Pool:
    window = reader.read_int(), reader.read_int()
    stride = reader.read_int(4), reader.read_int(4)
    pad = reader.read_int(4), reader.read_int(4)
    if (min(window) < 1 and window != (0, 0)) or min(stride) < 1 or min(pad) < 0:
        raise reader.fail(f"bad pooling window {window}, stride {stride} or padding {pad}")
    return Pool(window, stride, pad)


def _read_fc(reader: DlibReader) -> Fc:
    outputs, inputs = reader.read_uint(), reader.read_uint()
    params = read_tensor(reader).reshape(-1)
    weight_shape = read_alias(reader)
    read_alias(reader)  # biases: unused without bias
    _expect(reader, "fc bias mode", reader.read_int(4), FC_NO_BIAS)
    _read_multipliers(reader)
    _expect(reader, "fc weights shape", weight_shape, (inputs, outputs, 1, 1))
    _expect(reader, "fc parameter count", params.size, inputs * outputs)
    return Fc(params.reshape(inputs, outputs))


def _no_fields(reader: DlibReader) -> None:
    """relu and add_prev: the record is just the name."""
    return None


READERS = {
    "con": _read_conv,
    "affine": _read_affine,
    "relu": _no_fields,
    "max_pool": _read_pool,
    "avg_pool": _read_pool,
    "add_prev1": _no_fields,
    "add_prev2": _no_fields,
    "fc": _read_fc,
}


def _wrapper_version(position: int, op: str) -> int:
    """The version dlib wrote for the wrapper of ARCHITECTURE[position]."""
    if op in MARKERS:
        return MARKER_VERSION
    return INPUT_LAYER_VERSION if position == 0 else LAYER_VERSION


def _read_layer(reader: DlibReader, op: str, on_input: bool) -> Layer:
    """One layer record: its name, its fields, then the training state that follows every layer."""
    _expect(reader, "layer record", reader.read_string(), RECORD_NAMES[op])
    layer = READERS[op](reader)
    for _ in range(LAYER_TAIL_BOOLS):
        reader.read_bool()
    for _ in range(LAYER_TAIL_TENSORS):
        read_tensor(reader)
    if on_input:
        _expect(reader, "sample expansion factor", reader.read_uint(4), SAMPLE_EXPANSION_FACTOR)
    return layer


def _read_input(reader: DlibReader) -> tuple[tuple[float, float, float], int]:
    _expect(reader, "input record", reader.read_string(), INPUT_RECORD)
    means = reader.read_float(), reader.read_float(), reader.read_float()
    rows, cols = reader.read_uint(), reader.read_uint()
    if rows != cols or rows == 0:
        raise reader.fail(f"input size {rows}x{cols}, expected a non-empty square")
    return means, rows


def parse_resnet(data: bytes) -> DlibResNet:
    """The network in the bytes of dlib_face_recognition_resnet_model_v1.dat, checked against ARCHITECTURE."""
    reader = DlibReader(data)
    _expect(reader, "loss layer version", reader.read_int(4), LOSS_LAYER_VERSION)
    _expect(reader, "loss record", reader.read_string(), LOSS_RECORD)
    for _ in ("margin", "distance threshold"):  # training only
        reader.read_float()
    for position in reversed(range(len(ARCHITECTURE))):
        op = ARCHITECTURE[position]
        wanted = _wrapper_version(position, op)
        _expect(reader, f"version of wrapper {position} ({op})", reader.read_int(4), wanted)
    means, size_px = _read_input(reader)
    steps = [
        (op, None if op in MARKERS else _read_layer(reader, op, on_input=position == 0))
        for position, op in enumerate(ARCHITECTURE)
    ]
    reader.expect_end()
    return DlibResNet(means, size_px, steps)


# ---- graph -------------------------------------------------------------------------------------------


def fold_affines(steps: list[Step]) -> list[Step]:
    """Merge each affine into the conv just before it (ARCHITECTURE has no other kind):
    w' = w * gamma, b' = b * gamma + beta, computed in float64."""
    folded: list[Step] = []
    for op, layer in steps:
        if op != "affine":
            folded.append((op, layer))
            continue
        conv = folded[-1][1]
        gamma, beta = layer.gamma.astype(np.float64), layer.beta.astype(np.float64)
        if gamma.size != conv.weights.shape[0]:
            raise ModelError(f"affine has {gamma.size} channels, the conv before it {conv.weights.shape[0]}")
        weights = conv.weights.astype(np.float64) * gamma[:, None, None, None]
        bias = conv.bias.astype(np.float64) * gamma + beta
        folded[-1] = ("con", replace(conv, weights=weights.astype(np.float32), bias=bias.astype(np.float32)))
    return folded


Shape = tuple[int, int, int]  # channels, rows, cols of one sample
Value = tuple[str, Shape]


def _output_size(size: int, window: int, stride: int, pad: int) -> int:
    """dlib's (and ONNX's) floored output size of a conv or pooling layer."""
    out = (size + 2 * pad - window) // stride + 1
    if out < 1:
        raise ModelError(f"a {window}-wide window with stride {stride}, padding {pad} does not fit a map of {size}")
    return out


def _conv(graph: Graph, value: Value, conv: Conv) -> Value:
    name, (channels, rows, cols) = value
    filters, in_channels, kh, kw = conv.weights.shape
    if in_channels != channels:
        raise ModelError(f"conv expects {in_channels} input channels, the network gives it {channels}")
    (sy, sx), (py, px) = conv.stride, conv.pad
    out = graph.node(
        "Conv",
        [name, graph.const("conv_w", conv.weights), graph.const("conv_b", conv.bias)],
        kernel_shape=[kh, kw], strides=[sy, sx], pads=[py, px, py, px],
    )
    return out, (filters, _output_size(rows, kh, sy, py), _output_size(cols, kw, sx, px))


def _pool(graph: Graph, value: Value, pool: Pool, op: str) -> Value:
    name, (channels, rows, cols) = value
    if pool.window == (0, 0):
        if op != "avg_pool":
            raise ModelError("global max pooling is not supported")
        return graph.node("GlobalAveragePool", [name]), (channels, 1, 1)
    (wy, wx), (sy, sx), (py, px) = pool.window, pool.stride, pool.pad
    # dlib clips windows at the border: max ignores padding, average divides by the cells inside (ONNX
    # defaults, count_include_pad=0).
    out = graph.node(
        "MaxPool" if op == "max_pool" else "AveragePool",
        [name],
        kernel_shape=[wy, wx], strides=[sy, sx], pads=[py, px, py, px],
    )
    return out, (channels, _output_size(rows, wy, sy, py), _output_size(cols, wx, sx, px))


def _pad_to(graph: Graph, value: Value, shape: Shape) -> str:
    """Zero-pad a value at the end of each of its dimensions up to `shape` (dlib's add of unequal tensors)."""
    name, own = value
    if own == shape:
        return name
    ends = [0] + [want - have for want, have in zip(shape, own)]
    pads = np.array([0, 0, 0, 0] + ends, dtype=np.int64)
    return graph.node("Pad", [name, graph.const("pads", pads)], mode="constant")


def _add(graph: Graph, first: Value, second: Value) -> Value:
    shape = tuple(max(a, b) for a, b in zip(first[1], second[1]))
    return graph.node("Add", [_pad_to(graph, first, shape), _pad_to(graph, second, shape)]), shape


def _fc(graph: Graph, value: Value, fc: Fc) -> tuple[str, int]:
    """Flatten (dlib's k, rows, cols order) then MatMul; returns the output name and width."""
    name, shape = value
    inputs, outputs = fc.weights.shape
    if inputs != math.prod(shape):
        raise ModelError(f"fc expects {inputs} inputs, the network gives it {math.prod(shape)}")
    flat = graph.node("Flatten", [name], axis=1)
    return graph.node("MatMul", [flat, graph.const("fc_w", fc.weights)], output=OUTPUT_NAME), outputs


def _normalise(graph: Graph, means_rgb: tuple[float, float, float]) -> str:
    means = np.array(means_rgb, dtype=np.float32).reshape(1, INPUT_CHANNELS, 1, 1)
    centred = graph.node("Sub", [INPUT_NAME, graph.const("means_rgb", means)])
    return graph.node("Mul", [centred, graph.const("pixel_scale", np.array(PIXEL_SCALE, dtype=np.float32))])


def build_graph(net: DlibResNet) -> onnx.ModelProto:
    """The ONNX model for a parsed network; tags and skips are followed as dlib does."""
    graph = Graph()
    value: Value = (_normalise(graph, net.means_rgb), (INPUT_CHANNELS, net.size_px, net.size_px))
    tags: dict[str, Value] = {}
    embedding_dim = 0
    for op, layer in fold_affines(net.steps):
        if op in ("tag1", "tag2"):
            tags[op] = value
        elif op == "skip1":
            value = tags["tag1"]
        elif op == "con":
            value = _conv(graph, value, layer)
        elif op == "relu":
            value = graph.node("Relu", [value[0]]), value[1]
        elif op in ("max_pool", "avg_pool"):
            value = _pool(graph, value, layer, op)
        elif op in ("add_prev1", "add_prev2"):
            value = _add(graph, value, tags["tag" + op[-1]])
        elif op == "fc":
            _, embedding_dim = _fc(graph, value, layer)
    return _model(graph, embedding_dim, net)


def _model(graph: Graph, embedding_dim: int, net: DlibResNet) -> onnx.ModelProto:
    chips = helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, INPUT_CHANNELS, net.size_px, net.size_px]
    )
    embeddings = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, embedding_dim])
    body = helper.make_graph(graph.nodes, "dlib_face_recognition_resnet_model_v1", [chips], [embeddings],
                             initializer=graph.initializers)
    means = ", ".join(f"{mean:.3f}" for mean in net.means_rgb)
    model = helper.make_model(
        body,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="engines.dlib_to_onnx",
        doc_string=(
            f"dlib face recognition ResNet. {INPUT_NAME}: N x 3 x {net.size_px} x {net.size_px} RGB, pixel values "
            f"0..255 (means {means} subtracted in-graph, then /256). {OUTPUT_NAME}: raw dlib descriptor "
            f"N x {embedding_dim}, not unit length."
        ),
    )
    onnx.checker.check_model(model)
    return model


# ---- file --------------------------------------------------------------------------------------------


def convert(dat_path: Path, onnx_path: Path) -> None:
    """Parse the dlib .dat at dat_path and write the ONNX model to onnx_path (temp file, then os.replace)."""
    dat_path, onnx_path = Path(dat_path), Path(onnx_path)
    net = parse_model_file(dat_path, parse_resnet, "dlib face recognition model")
    write_atomically(build_graph(net).SerializeToString(), onnx_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.dlib_to_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("dat", type=Path, help="dlib_face_recognition_resnet_model_v1.dat")
    parser.add_argument("onnx", type=Path, help="output .onnx file")
    args = parser.parse_args(argv)
    return run_conversion(lambda: convert(args.dat, args.onnx), args.onnx)


if __name__ == "__main__":
    sys.exit(main())
