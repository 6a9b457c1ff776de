"""The FP16 form of the embedding model, for TensorRT's strongly typed FP16 engines, and an FP16 check on CPU.

TensorRT 11 removed the weak-typing `BuilderFlag.FP16` (10.12 deprecated it): the precision must be in the ONNX
graph itself. `to_fp16` stores every weight and activation as float16 and keeps the graph's input `chips` and
output `embeddings` float32 (one Cast at each end), so the engine's I/O and the backend stay the same.

`round_to_fp16` is the CPU stand-in used by the tests and `make bench`: the fp32 graph with every weight and
every intermediate tensor rounded to float16 (arithmetic stays fp32, as in TensorRT's FP16 kernels, which
accumulate in fp32). It shows on any machine whether the network survives FP16 storage: range (no activation
near 65504) and precision (cosine against fp32).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP16_MAX = 65504.0


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and activations, float32 graph input and output; the result passes onnx.checker."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # both ship with onnxruntime
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(model, keep_io_types=True)
    # the converter appends its Casts at the end; onnx.checker and TensorRT's parser want topological order
    OnnxModel.graph_topological_sort(converted.graph, is_deterministic=True)
    onnx.checker.check_model(converted)
    return converted


def float16_initializers(model: onnx.ModelProto) -> tuple[int, int]:
    """(float16 initializers, float32 initializers) of a graph."""
    kinds = [init.data_type for init in model.graph.initializer]
    return kinds.count(TensorProto.FLOAT16), kinds.count(TensorProto.FLOAT)


def round_to_fp16(model: onnx.ModelProto, *, expose: bool = False) -> onnx.ModelProto:
    """The fp32 graph with weights and every node output rounded through float16 (fp32 arithmetic).

    expose=True also makes every intermediate tensor (after rounding) a graph output, for range checks.
    """
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    graph = rounded.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    nodes, intermediates = [], []
    final = {out.name for out in graph.output}
    for node in graph.node:
        outputs = list(node.output)
        for i, name in enumerate(outputs):
            node.output[i] = f"{name}__fp32"
        nodes.append(node)
        for name in outputs:
            nodes.append(helper.make_node("Cast", [f"{name}__fp32"], [f"{name}__fp16"], to=TensorProto.FLOAT16))
            nodes.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT))
            if name not in final:
                intermediates.append(name)
    del graph.node[:]
    graph.node.extend(nodes)
    if expose:
        graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in intermediates)
    return rounded


def exact_session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session that runs the graph as written (no fusions that would drop the Casts)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
