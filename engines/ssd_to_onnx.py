"""Convert the res10 SSD face detector (Caffe deploy.prototxt + .caffemodel) to ONNX, without Caffe.

`python -m engines.ssd_to_onnx CAFFEMODEL ONNX [--prototxt FILE]` (the prototxt defaults to deploy.prototxt
next to the caffemodel). The prototxt text is parsed here; the weights are read through OpenCV
(`cv2.dnn.readNetFromCaffe`, then each layer's blobs), which stores them as Caffe does: BatchNorm keeps
(mean, variance, scale factor), so mean / factor and variance / factor are the statistics; Scale keeps
(gamma, beta); Normalize keeps one scale per channel.

Graph: `image` (1, 3, H, W) float32, BGR pixels minus the training means (what cv2.dnn.blobFromImage
makes; H and W are dynamic) -> three outputs, in this order:

    mbox_loc           (1, P * 4)   box offsets for every prior, as the DetectionOutput layer reads them
    mbox_conf_flatten  (1, P * C)   softmax class scores for every prior
    prior_grids        (2 * heads,) int64 rows, cols of each PriorBox layer's feature map

BatchNorm and Scale become one per-channel affine, folded into the convolution before it where that
convolution feeds nothing else (else one BatchNormalization node with unit variance, e.g. after each residual
sum); Caffe's ceil-rounded pooling is ONNX ceil_mode.
PriorBox and DetectionOutput are not ONNX operators: their parameters go into the model's metadata
(`ssd_postprocess`, JSON) and edge.detect computes the priors and decodes the boxes in numpy.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge.detect import METADATA_KEY, PROTOTXT
from edge.errors import ModelError
from engines.fetch import write_atomically
from engines.onnx_common import IR_VERSION, OPSET, Graph, run_conversion

INPUT_NAME = "image"
LOC_OUTPUT, CONF_OUTPUT, GRIDS_OUTPUT = "mbox_loc", "mbox_conf_flatten", "prior_grids"
INPUT_CHANNELS = 3
BN_EPS = 1e-5  # Caffe's BatchNormParameter.eps default
NORM_EPS = 1e-10  # Caffe SSD's NormalizeParameter.eps default
PRIOR_OFFSET = 0.5  # Caffe SSD's PriorBoxParameter.offset default
SAME_RATIO = 1e-6  # aspect ratios closer than this are one (Caffe SSD's PriorBox)
NCHW_SPATIAL = (2, 4)  # Shape slice of a feature map giving (rows, cols)


# ---- prototxt ----------------------------------------------------------------------------------------

Message = dict[str, list]  # field name -> its values in file order (scalars or nested messages)

_TOKEN = re.compile(
    r"""(?P<space>\s+|\#[^\n]*)|"(?P<string>(?:[^"\\\n]|\\.)*)"|'(?P<string1>(?:[^'\\\n]|\\.)*)'"""
    r"""|(?P<punct>[{}:])|(?P<word>[^\s{}:"'\#]+)"""
)
_FIELD = re.compile(r"[A-Za-z_]\w*")
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)


class PrototxtError(ValueError):
    """The prototxt text does not follow the protobuf text format (message says where)."""


def _scalar(word: str) -> bool | int | float | str:
    """A bare protobuf text value: bool, int, float, or an enum name kept as a string."""
    if word in ("true", "false"):
        return word == "true"
    if _INT.fullmatch(word):
        return int(word)
    if _FLOAT.fullmatch(word):
        return float(word)
    return word


def _tokens(text: str) -> list[tuple[str, str | bool | int | float, int]]:
    """(kind, value, line) for each token; kind is `{`, `}`, `:`, `name` or `value`."""
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise PrototxtError(f"line {text.count(chr(10), 0, pos) + 1}: unexpected {text[pos]!r}")
        line = text.count("\n", 0, pos) + 1
        quoted = match["string"] if match["string"] is not None else match["string1"]
        if quoted is not None:
            tokens.append(("value", re.sub(r"\\(.)", r"\1", quoted), line))
        elif match["punct"]:
            tokens.append((match["punct"], match["punct"], line))
        elif match["word"]:
            tokens.append(("name", match["word"], line))
        pos = match.end()
    return tokens


def parse_prototxt(text: str) -> Message:
    """Parse protobuf text format (`name: value`, `name { ... }`, `# comments`) into nested dicts of lists."""
    root: Message = {}
    stack = [root]
    tokens = _tokens(text)
    i = 0
    while i < len(tokens):
        kind, value, line = tokens[i]
        if kind == "}":
            if len(stack) == 1:
                raise PrototxtError(f"line {line}: unmatched '}}'")
            stack.pop()
            i += 1
            continue
        if kind != "name" or not _FIELD.fullmatch(value):
            raise PrototxtError(f"line {line}: expected a field name, found {value!r}")
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("end", "end of file", line)
        after = tokens[i + 2] if i + 2 < len(tokens) else ("end", "end of file", line)
        if nxt[0] == "{" or (nxt[0] == ":" and after[0] == "{"):
            child: Message = {}
            stack[-1].setdefault(value, []).append(child)
            stack.append(child)
            i += 2 if nxt[0] == "{" else 3
        elif nxt[0] == ":" and after[0] in ("name", "value"):
            stack[-1].setdefault(value, []).append(_scalar(after[1]) if after[0] == "name" else after[1])
            i += 3
        else:
            found = after if nxt[0] == ":" else nxt
            raise PrototxtError(
                f"line {found[2]}: expected ':' and a value or '{{' after {value!r}, found {found[1]!r}"
            )
    if len(stack) != 1:
        raise PrototxtError("unexpected end of file: a '{' is not closed")
    return root


def _one(message: Message, key: str, default=None):
    """The single value of an optional field (the last one, as protobuf does)."""
    values = message.get(key)
    return values[-1] if values else default


@dataclass(frozen=True)
class Layer:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: Message  # the layer's own <type>_param message ({} when absent)


PARAM_FIELDS = {
    "Convolution": "convolution_param", "BatchNorm": "batch_norm_param", "Scale": "scale_param",
    "Pooling": "pooling_param", "ReLU": "relu_param", "Eltwise": "eltwise_param", "Normalize": "norm_param",
    "Permute": "permute_param", "Flatten": "flatten_param", "Concat": "concat_param",
    "Reshape": "reshape_param", "Softmax": "softmax_param", "PriorBox": "prior_box_param",
    "DetectionOutput": "detection_output_param",
}


def read_layers(net: Message) -> tuple[str, list[Layer]]:
    """The network's input blob name and its layers in file order."""
    if "layers" in net:
        raise ModelError("prototxt uses the old V1 `layers` format; upgrade it with Caffe's upgrade_net_proto_text")
    layers = [
        Layer(
            name=_one(raw, "name", ""),
            type=_one(raw, "type", ""),
            bottoms=list(raw.get("bottom", [])),
            tops=list(raw.get("top", [])),
            params=_one(raw, PARAM_FIELDS.get(_one(raw, "type", ""), ""), {}),
        )
        for raw in net.get("layer", [])
    ]
    inputs = list(net.get("input", [])) + [t for layer in layers if layer.type == "Input" for t in layer.tops]
    if len(inputs) != 1:
        raise ModelError(f"expected one network input, found {len(inputs)}")
    if not layers:
        raise ModelError("the prototxt has no layers")
    return inputs[0], [layer for layer in layers if layer.type != "Input"]


# ---- Caffe layers -> ONNX-like ops -------------------------------------------------------------------


@dataclass(eq=False)
class Op:
    """One node before emission: an ONNX op type, or `Affine` / `Normalize` (expanded when emitted)."""

    op_type: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    consts: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class PriorHead:
    """One PriorBox layer: the feature map it tiles and the box shapes at each cell (OpenCV's semantics)."""

    source: str
    sizes_px: list[tuple[float, float]]
    step_px: float | None  # None: image size / feature map size
    offset: float
    clip: bool
    variance: list[float]


def _pair(params: Message, key: str, default: int) -> tuple[int, int]:
    """Caffe's (rows, cols) for kernel/stride/pad: `key_h`/`key_w`, or one repeated `key` value."""
    if f"{key}_h" in params or f"{key}_w" in params:
        return int(_one(params, f"{key}_h", default)), int(_one(params, f"{key}_w", default))
    values = params.get(key if key != "kernel" else "kernel_size", [])
    if len(values) > 2:
        raise ModelError(f"{key} with {len(values)} values: only 2-D layers are supported")
    values = values or [default]
    return int(values[0]), int(values[-1])


def _blobs(layer: Layer, blobs: list[np.ndarray], count: int) -> list[np.ndarray]:
    if len(blobs) < count:
        raise ModelError(f"layer {layer.name}: the caffemodel has {len(blobs)} weight blobs, it needs {count}")
    return [np.asarray(b, dtype=np.float32) for b in blobs[:count]]


def _convolution(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    p = layer.params
    bias_term = _one(p, "bias_term", True)
    weights, *bias = _blobs(layer, blobs, 2 if bias_term else 1)
    filters = int(_one(p, "num_output", 0))
    if weights.ndim != 4 or weights.shape[0] != filters:
        raise ModelError(f"layer {layer.name}: weights {weights.shape} do not match num_output {filters}")
    (kh, kw), (sy, sx), (py, px) = _pair(p, "kernel", 0), _pair(p, "stride", 1), _pair(p, "pad", 0)
    dilation = _pair(p, "dilation", 1)
    if (kh, kw) != weights.shape[2:]:
        raise ModelError(f"layer {layer.name}: kernel {kh}x{kw} but weights {weights.shape}")
    consts = [weights, bias[0].reshape(filters) if bias else np.zeros(filters, np.float32)]
    attrs = dict(kernel_shape=[kh, kw], strides=[sy, sx], pads=[py, px, py, px], dilations=list(dilation),
                 group=int(_one(p, "group", 1)))
    return Op("Conv", inputs, layer.name, attrs, consts)


def _batch_norm(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    mean, var, factor = (b.astype(np.float64).ravel() for b in _blobs(layer, blobs, 3))
    if not _one(layer.params, "use_global_stats", True):
        raise ModelError(f"layer {layer.name}: BatchNorm without global statistics cannot be exported")
    inverse = 0.0 if factor[0] == 0 else 1.0 / factor[0]  # Caffe: a zero factor means zero statistics
    gain = 1.0 / np.sqrt(var * inverse + float(_one(layer.params, "eps", BN_EPS)))
    return Op("Affine", inputs, layer.name, consts=[gain, -mean * inverse * gain])


def _scale(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    p = layer.params
    if len(inputs) != 1 or _one(p, "axis", 1) != 1 or _one(p, "num_axes", 1) != 1:
        raise ModelError(f"layer {layer.name}: only a per-channel Scale with learned gamma is supported")
    gamma, *beta = (b.astype(np.float64).ravel() for b in _blobs(layer, blobs, 2 if _one(p, "bias_term", False) else 1))
    return Op("Affine", inputs, layer.name, consts=[gamma, beta[0] if beta else np.zeros_like(gamma)])


def _relu(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    slope = float(_one(layer.params, "negative_slope", 0.0))
    return Op("LeakyRelu", inputs, layer.name, dict(alpha=slope)) if slope else Op("Relu", inputs, layer.name)


def _pooling(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    p = layer.params
    kind = {"MAX": "Max", 0: "Max", "AVE": "Average", 1: "Average"}.get(_one(p, "pool", "MAX"))
    if kind is None:
        raise ModelError(f"layer {layer.name}: pooling {_one(p, 'pool')} is not supported")
    if _one(p, "global_pooling", False):
        return Op(f"Global{kind}Pool", inputs, layer.name)
    if _pair(p, "pad", 0) != (0, 0):
        # Caffe drops a last window that would start in the padding; ONNX runtimes disagree on that case.
        raise ModelError(f"layer {layer.name}: padded pooling is not supported")
    # Caffe rounds the output size up: ONNX ceil_mode. Without padding a window never starts outside the
    # map, and Caffe's average then divides by the cells inside, like count_include_pad=0.
    attrs = dict(kernel_shape=list(_pair(p, "kernel", 0)), strides=list(_pair(p, "stride", 1)), ceil_mode=1)
    return Op(f"{kind}Pool", inputs, layer.name, attrs)


def _eltwise(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    if _one(layer.params, "operation", "SUM") not in ("SUM", 1) or "coeff" in layer.params or len(inputs) != 2:
        raise ModelError(f"layer {layer.name}: only a plain sum of two blobs is supported")
    return Op("Add", inputs, layer.name)


def _normalize(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    p = layer.params
    (scale,) = _blobs(layer, blobs, 1)
    axes = [1, 2, 3] if _one(p, "across_spatial", True) else [1]
    scale = scale.ravel() if not _one(p, "channel_shared", True) else scale.ravel()[:1]
    return Op("Normalize", inputs, layer.name, dict(axes=axes, eps=float(_one(p, "eps", NORM_EPS))), [scale])


def _permute(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    return Op("Transpose", inputs, layer.name, dict(perm=[int(v) for v in layer.params.get("order", [])]))


def _flatten(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    if _one(layer.params, "axis", 1) != 1 or _one(layer.params, "end_axis", -1) != -1:
        raise ModelError(f"layer {layer.name}: only Flatten from axis 1 to the end is supported")
    return Op("Flatten", inputs, layer.name, dict(axis=1))


def _concat(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    return Op("Concat", inputs, layer.name, dict(axis=int(_one(layer.params, "axis", 1))))


def _reshape(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    p = layer.params
    if _one(p, "axis", 0) != 0 or _one(p, "num_axes", -1) != -1:
        raise ModelError(f"layer {layer.name}: only a Reshape of all axes is supported")
    dims = np.array(_one(p, "shape", {}).get("dim", []), dtype=np.int64)
    return Op("Reshape", inputs, layer.name, consts=[dims])


def _softmax(layer: Layer, blobs: list[np.ndarray], inputs: list[str]) -> Op:
    return Op("Softmax", inputs, layer.name, dict(axis=int(_one(layer.params, "axis", 1))))


TRANSLATORS = {
    "Convolution": _convolution, "BatchNorm": _batch_norm, "Scale": _scale, "ReLU": _relu,
    "Pooling": _pooling, "Eltwise": _eltwise, "Normalize": _normalize, "Permute": _permute,
    "Flatten": _flatten, "Concat": _concat, "Reshape": _reshape, "Softmax": _softmax,
}


def _prior_head(layer: Layer, source: str) -> PriorHead:
    """OpenCV's PriorBox box list: min size, sqrt(min * max), then each aspect ratio (and its inverse)."""
    p = layer.params
    unsupported = {"width", "height", "step_h", "step_w", "offset_h", "offset_w", "img_size", "img_h", "img_w"} & set(p)
    if unsupported or len(p.get("min_size", [])) != 1 or len(p.get("max_size", [])) > 1:
        raise ModelError(f"layer {layer.name}: only one min_size (and max_size) with a square step is supported")
    min_size, max_size = float(_one(p, "min_size")), float(_one(p, "max_size", 0.0))
    ratios: list[float] = []
    for ratio in (float(r) for r in p.get("aspect_ratio", [])):
        if all(abs(ratio - r) >= SAME_RATIO for r in [1.0, *ratios]):
            ratios += [ratio, 1.0 / ratio] if _one(p, "flip", True) else [ratio]
    sizes = [(min_size, min_size)]
    if max_size > 0:
        sizes.append((math.sqrt(min_size * max_size),) * 2)
    sizes += [(min_size * math.sqrt(r), min_size / math.sqrt(r)) for r in ratios]
    variance = [float(v) for v in p.get("variance", [0.1])]
    if len(variance) not in (1, 4):
        raise ModelError(f"layer {layer.name}: give 1 or 4 variances, not {len(variance)}")
    step = _one(p, "step")
    clip = bool(_one(p, "clip", False))  # Caffe SSD's default (OpenCV's importer assumes true when absent)
    return PriorHead(source, sizes, float(step) if step else None, float(_one(p, "offset", PRIOR_OFFSET)), clip,
                     variance * (4 // len(variance)))


def _detection_params(layer: Layer) -> dict:
    """DetectionOutput's settings, refusing the variants edge.detect does not implement."""
    p = layer.params
    nms = _one(p, "nms_param", {})
    if (not _one(p, "share_location", True) or _one(p, "variance_encoded_in_target", False)
            or _one(p, "code_type", "CORNER") not in ("CENTER_SIZE", 2) or _one(nms, "eta", 1.0) != 1.0):
        raise ModelError(f"layer {layer.name}: only shared CENTER_SIZE boxes, variances in the priors, eta 1")
    return {
        "num_classes": int(_one(p, "num_classes")),
        "background_label_id": int(_one(p, "background_label_id", 0)),
        "confidence_threshold": float(_one(p, "confidence_threshold", 0.0)),
        "nms_threshold": float(_one(nms, "nms_threshold", 0.3)),
        "top_k": int(_one(nms, "top_k", -1)),
        "keep_top_k": int(_one(p, "keep_top_k", -1)),
        "clip": bool(_one(p, "clip", False)),
    }


@dataclass
class Network:
    """The translated network: ops in order, the detection inputs, and the postprocessing parameters."""

    ops: list[Op]
    loc: str
    conf: str
    priors: list[PriorHead]
    detection: dict


def translate(prototxt: Message, weights: dict[str, list[np.ndarray]]) -> Network:
    """Walk the parsed prototxt's layers in order (Caffe's in-place tops rename a blob) into ops; `weights`
    maps layer names to their blobs."""
    input_blob, layers = read_layers(prototxt)
    values: dict[str, str | list[PriorHead]] = {input_blob: INPUT_NAME}  # Caffe blob -> op output or priors
    names = {INPUT_NAME}  # op outputs are named after their layers
    ops: list[Op] = []
    detection = None
    for layer in layers:
        missing = [b for b in layer.bottoms if b not in values]
        if missing or not layer.bottoms:
            raise ModelError(f"layer {layer.name!r} reads {missing or 'no blob'}, which no earlier layer makes")
        inputs = [values[b] for b in layer.bottoms]
        if layer.type == "DetectionOutput":
            if detection is not None or len(inputs) != 3 or not isinstance(inputs[2], list):
                raise ModelError(f"layer {layer.name}: expected one DetectionOutput of (loc, conf, priors)")
            detection = (inputs, _detection_params(layer))
            continue
        if len(layer.tops) != 1 or layer.name in names:
            raise ModelError(f"layer {layer.name!r}: expected one top and a unique layer name")
        names.add(layer.name)
        if layer.type == "PriorBox":
            values[layer.tops[0]] = [_prior_head(layer, inputs[0])]
        elif layer.type == "Concat" and all(isinstance(v, list) for v in inputs):
            values[layer.tops[0]] = [head for v in inputs for head in v]
        elif layer.type in TRANSLATORS and all(isinstance(v, str) for v in inputs):
            ops.append(TRANSLATORS[layer.type](layer, weights.get(layer.name, []), inputs))
            values[layer.tops[0]] = layer.name
        else:
            raise ModelError(f"layer {layer.name!r} of type {layer.type!r} is not supported")
    if detection is None:
        raise ModelError("the prototxt has no DetectionOutput layer")
    (loc, conf, priors), params = detection
    if not (isinstance(loc, str) and isinstance(conf, str)):
        raise ModelError("DetectionOutput must read loc and conf from the network, priors from PriorBox layers")
    return Network(ops, loc, conf, priors, params)


# ---- graph -------------------------------------------------------------------------------------------


def _uses(ops: list[Op], outputs: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(outputs, 1)
    for op in ops:
        for name in op.inputs:
            counts[name] = counts.get(name, 0) + 1
    return counts


def fold_affines(ops: list[Op], outputs: list[str]) -> list[Op]:
    """Merge each affine into the Conv or affine that alone feeds it (BatchNorm, then Scale, into the conv);
    drop ops no output depends on."""
    uses = _uses(ops, outputs)
    producers: dict[str, Op] = {}
    folded: list[Op] = []
    for op in ops:
        source = producers.get(op.inputs[0])
        foldable = source is not None and source.op_type in ("Conv", "Affine") and uses[source.output] == 1
        if op.op_type == "Affine" and foldable:
            gain, shift = op.consts
            first, second = source.consts  # conv weights and bias, or the earlier gain and shift
            if source.op_type == "Conv":
                first = (first * gain[:, None, None, None]).astype(np.float32)
                second = (second * gain + shift).astype(np.float32)
            else:
                first, second = first * gain, second * gain + shift
            merged = replace(source, output=op.output, consts=[first, second])
            folded[folded.index(source)] = merged
            del producers[source.output]
            producers[op.output] = merged
            continue
        producers[op.output] = op
        folded.append(op)
    needed, kept = set(outputs), []
    for op in reversed(folded):
        if op.output in needed:
            needed.update(op.inputs)
            kept.append(op)
    return kept[::-1]


def _emit(graph: Graph, op: Op) -> None:
    if op.op_type == "Affine":
        # x * gain + shift per channel in one node: BatchNormalization with mean 0, variance 1, epsilon 0.
        gain, shift = (c.astype(np.float32) for c in op.consts)
        stats = [graph.const(f"{op.output}_{hint}", array) for hint, array in
                 (("gain", gain), ("shift", shift), ("mean", np.zeros_like(gain)), ("var", np.ones_like(gain)))]
        graph.node("BatchNormalization", [op.inputs[0], *stats], output=op.output, epsilon=0.0)
    elif op.op_type == "Normalize":
        # Caffe SSD's Normalize: x / sqrt(sum of x^2 over the axes + eps) * scale
        (scale,) = op.consts
        squares = graph.node("ReduceSumSquare", [op.inputs[0]], axes=op.attrs["axes"], keepdims=1)
        eps = graph.const(f"{op.output}_eps", np.array(op.attrs["eps"], dtype=np.float32))
        norm = graph.node("Sqrt", [graph.node("Add", [squares, eps])])
        unit = graph.node("Div", [op.inputs[0], norm])
        graph.node("Mul", [unit, graph.const(f"{op.output}_scale", scale.reshape(-1, 1, 1))], output=op.output)
    else:
        consts = [graph.const(f"{op.output}_{i}", c) for i, c in enumerate(op.consts)]
        graph.node(op.op_type, [*op.inputs, *consts], output=op.output, **op.attrs)


def postprocess_metadata(net: Network) -> str:
    """The JSON edge.detect needs to rebuild PriorBox and DetectionOutput."""
    heads = [
        {"sizes_px": [list(s) for s in h.sizes_px], "step_px": h.step_px, "offset": h.offset, "clip": h.clip,
         "variance": h.variance}
        for h in net.priors
    ]
    return json.dumps({"priors": heads, "detection": net.detection})


def build_graph(net: Network) -> onnx.ModelProto:
    """The ONNX model: backbone and heads up to loc and conf, plus the priors' feature-map sizes."""
    graph = Graph()
    # The outputs get fixed names whatever the prototxt calls those blobs.
    rename = {net.loc: LOC_OUTPUT, net.conf: CONF_OUTPUT}
    ops = fold_affines(net.ops, [net.loc, net.conf, *(h.source for h in net.priors)])
    if any(op.output in rename.values() and op.output not in rename for op in ops):
        raise ModelError(f"a layer other than the detection inputs is named {LOC_OUTPUT} or {CONF_OUTPUT}")
    for op in ops:
        _emit(graph, replace(op, inputs=[rename.get(n, n) for n in op.inputs], output=rename.get(op.output, op.output)))
    start, end = NCHW_SPATIAL
    grids = [graph.node("Shape", [rename.get(h.source, h.source)], start=start, end=end) for h in net.priors]
    graph.node("Concat", grids, output=GRIDS_OUTPUT, axis=0)
    image = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, INPUT_CHANNELS, "height", "width"])
    outputs = [
        helper.make_tensor_value_info(LOC_OUTPUT, TensorProto.FLOAT, [1, "loc_values"]),
        helper.make_tensor_value_info(CONF_OUTPUT, TensorProto.FLOAT, [1, "conf_values"]),
        helper.make_tensor_value_info(GRIDS_OUTPUT, TensorProto.INT64, [2 * len(net.priors)]),
    ]
    model = helper.make_model(
        helper.make_graph(graph.nodes, "res10_ssd", [image], outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="engines.ssd_to_onnx",
        doc_string=(
            f"res10 SSD face detector. {INPUT_NAME}: 1 x 3 x H x W BGR pixels minus the training means "
            f"(cv2.dnn.blobFromImage). Outputs {LOC_OUTPUT}, {CONF_OUTPUT} (softmax), {GRIDS_OUTPUT} (rows, cols "
            f"per prior layer); priors and box decoding from metadata '{METADATA_KEY}'."
        ),
    )
    helper.set_model_props(model, {METADATA_KEY: postprocess_metadata(net)})
    onnx.checker.check_model(model)
    return model


# ---- files -------------------------------------------------------------------------------------------

_CV_REASON = re.compile(r"error: \([^)]*\) (.*?)(?: in function|$)", re.DOTALL)


def read_weights(prototxt: Path, caffemodel: Path) -> dict[str, list[np.ndarray]]:
    """Each layer's weight blobs, read by OpenCV's Caffe importer (Caffe itself is not needed)."""
    import cv2

    try:
        net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    except cv2.error as err:
        found = _CV_REASON.search(str(err))
        reason = " ".join(found[1].split()) if found else "unknown error"
        raise ModelError(
            f"OpenCV cannot read {caffemodel.name} with {prototxt.name} ({reason}): delete them and run `make models`"
        ) from None
    return {name: list(net.getLayer(net.getLayerId(name)).blobs) for name in net.getLayerNames()}


def convert(caffemodel: Path, onnx_path: Path, prototxt: Path | None = None) -> None:
    """Convert `caffemodel` (with `prototxt`, default deploy.prototxt beside it) to onnx_path, atomically."""
    caffemodel, onnx_path = Path(caffemodel), Path(onnx_path)
    prototxt = Path(prototxt) if prototxt is not None else caffemodel.with_name(PROTOTXT)
    for path in (prototxt, caffemodel):
        if not path.is_file():
            raise ModelError(f"{path} not found: run `make models` to fetch it")
    try:
        message = parse_prototxt(prototxt.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"cannot read {prototxt} ({err}): delete it and run `make models`") from None
    except PrototxtError as err:
        raise ModelError(f"{prototxt} is not a valid prototxt ({err})") from None
    weights = read_weights(prototxt, caffemodel)
    try:
        net = translate(message, weights)
    except ModelError as err:
        raise ModelError(f"{prototxt}: {err}") from None
    write_atomically(build_graph(net).SerializeToString(), onnx_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.ssd_to_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("caffemodel", type=Path, help="res10_300x300_ssd_iter_140000.caffemodel")
    parser.add_argument("onnx", type=Path, help="output .onnx file")
    parser.add_argument(
        "--prototxt", type=Path, default=None, help=f"network definition (default: {PROTOTXT} beside the caffemodel)"
    )
    args = parser.parse_args(argv)
    return run_conversion(lambda: convert(args.caffemodel, args.onnx, args.prototxt), args.onnx)


if __name__ == "__main__":
    sys.exit(main())
