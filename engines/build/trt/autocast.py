"""Mixed precision written into the ONNX graph, for strongly typed TensorRT builds (pure onnx).

TensorRT 11 removed the weakly typed precision flags (`BuilderFlag.FP16`,
`OBEY_PRECISION_CONSTRAINTS`, `ILayer.precision`), and 10.12+ deprecates them: a strongly
typed network runs each layer in the dtype its inputs have. So for those builds the graph
itself says which parts are FP16. `matmuls_to_fp16` does the conservative version of
that: every MatMul/Gemm (nearly all the FLOPs) gets FP16 weights and `Cast` nodes around
it, and every other node (softmax, layer norm, pooling, L2 norm) keeps computing in FP32,
the same split `engines.build.trt.precision` asks of a weakly typed build. Graph inputs and
outputs keep their dtypes. Only the top-level graph is rewritten.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.build.trt.precision import FP16_MAX

FP16_OPS = frozenset({"MatMul", "Gemm"})
_PREFIX = "autocast"


@dataclass(frozen=True, slots=True)
class AutocastReport:
    converted: tuple[str, ...]  # nodes now computing in FP16
    kept_fp32: tuple[str, ...]  # MatMul/Gemm nodes left in FP32 (asked, or weights > FP16 range)
    unmatched: tuple[str, ...]  # names in keep_fp32 that name no node


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # unknown types are treated as FLOAT below
        graph = model.graph
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*graph.input, *graph.value_info, *graph.output]
    }
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def matmuls_to_fp16(
    model: onnx.ModelProto, *, keep_fp32: Collection[str] = ()
) -> tuple[onnx.ModelProto, AutocastReport]:
    """A copy of `model` whose MatMul/Gemm nodes run in FP16 (see the module docstring).

    Nodes named in `keep_fp32` stay FP32, as does any node with a weight beyond FP16's
    range. The input model is not changed.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = _elem_types(model)
    inits = {t.name: t for t in graph.initializer}
    node_names = {n.name for n in graph.node}
    keep = set(keep_fp32)

    fp16_inits: dict[str, TensorProto] = {}
    casted: dict[str, str] = {}  # fp32 activation -> its fp16 twin
    converted: list[str] = []
    kept: list[str] = []
    new_nodes: list[onnx.NodeProto] = []

    for index, node in enumerate(graph.node):
        float_inputs = [t for t in node.input if t and types.get(t, TensorProto.FLOAT) == 1]
        if node.op_type not in FP16_OPS or len(float_inputs) != len([t for t in node.input if t]):
            new_nodes.append(node)
            continue
        label = node.name or f"{node.op_type}_{index}"
        weights = [numpy_helper.to_array(inits[t]) for t in node.input if t in inits]
        too_big = any(w.size and float(np.abs(w).max()) > FP16_MAX for w in weights)
        if node.name in keep or too_big:
            kept.append(label)
            new_nodes.append(node)
            continue
        pre: list[onnx.NodeProto] = []
        for j, name in enumerate(node.input):
            if not name:
                continue
            twin = f"{name}__fp16"
            if name in inits:
                if twin not in fp16_inits:
                    arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                    fp16_inits[twin] = numpy_helper.from_array(arr, twin)
            elif name not in casted:
                casted[name] = twin
                pre.append(
                    helper.make_node(
                        "Cast",
                        [name],
                        [twin],
                        name=f"{_PREFIX}/{name}/to_fp16",
                        to=TensorProto.FLOAT16,
                    )
                )
            node.input[j] = twin
        post: list[onnx.NodeProto] = []
        for j, name in enumerate(node.output):
            if not name:
                continue
            half = f"{name}__fp16"
            node.output[j] = half
            post.append(
                helper.make_node(
                    "Cast", [half], [name], name=f"{_PREFIX}/{name}/to_fp32", to=TensorProto.FLOAT
                )
            )
        new_nodes.extend([*pre, node, *post])
        converted.append(label)

    used = {t for n in new_nodes for t in n.input} | {o.name for o in graph.output}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend([*kept_inits, *fp16_inits.values()])
    report = AutocastReport(
        converted=tuple(converted),
        kept_fp32=tuple(kept),
        unmatched=tuple(sorted(keep - node_names)),
    )
    return out, report
