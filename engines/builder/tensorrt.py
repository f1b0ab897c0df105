"""Build a TensorRT plan from the serving ONNX graph (export side: needs tensorrt and a GPU).

One path: a strongly typed network (TensorRT runs every layer in the dtype the graph gives
it; the weakly typed FP16 flags are deprecated in TensorRT 10 and gone in 11). For FP16,
`fp16_graph` writes the precision into the graph first: every MatMul/Gemm (nearly all the
FLOPs) gets FP16 weights and Casts around it, and every other node keeps computing in FP32:
the attention and head softmax, layer normalisation (its mean of squares overflows FP16 and
its epsilon is below FP16's smallest subnormal), the masked mean pooling and the final L2
normalisation. Graph inputs and outputs keep their dtypes. `fp16_graph` is pure onnx, so its
numerics are tested with onnxruntime on any machine.

`build_plan` reads top-down: import tensorrt -> rewrite -> parse -> one optimization profile
(batch 1..max_batch, sequence 1..max_seq) -> build -> write the plan and its record.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.backends.tensorrt import INPUT_NAMES, import_tensorrt, record_path
from engines.errors import BuildError
from engines.hashing import sha256_file

FP16_MAX = 65504.0
FP16_OPS = frozenset({"MatMul", "Gemm"})


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # unknown types count as FLOAT below
        graph = model.graph
    known = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*graph.input, *graph.value_info, *graph.output]
    }
    known.update({t.name: t.data_type for t in model.graph.initializer})
    names = {t for node in model.graph.node for t in node.input if t}
    return {t for t in names if known.get(t, TensorProto.FLOAT) == TensorProto.FLOAT}


def fp16_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` whose MatMul/Gemm nodes compute in FP16 (see the module docstring),
    and the names of those nodes. A node with a weight beyond FP16's range stays FP32."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    floats = _float_tensors(model)
    inits = {t.name: t for t in graph.initializer}
    halves: dict[str, TensorProto] = {}  # fp16 copies of weights
    casted: set[str] = set()  # activations already cast to fp16
    nodes: list[onnx.NodeProto] = []
    converted: list[str] = []
    for index, node in enumerate(graph.node):
        inputs = [t for t in node.input if t]
        weights = [numpy_helper.to_array(inits[t]) for t in inputs if t in inits]
        if (
            node.op_type not in FP16_OPS
            or not set(inputs) <= floats
            or any(w.size and float(np.abs(w).max()) > FP16_MAX for w in weights)
        ):
            nodes.append(node)
            continue
        for j, name in enumerate(node.input):
            if not name:
                continue
            twin = f"{name}__fp16"
            if name in inits and twin not in halves:
                arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                halves[twin] = numpy_helper.from_array(arr, twin)
            elif name not in inits and name not in casted:
                casted.add(name)
                nodes.append(helper.make_node("Cast", [name], [twin], to=TensorProto.FLOAT16))
            node.input[j] = twin
        after = []
        for j, name in enumerate(node.output):
            node.output[j] = f"{name}__fp16"
            after.append(helper.make_node("Cast", [node.output[j]], [name], to=TensorProto.FLOAT))
        nodes += [node, *after]
        converted.append(node.name or f"{node.op_type}_{index}")
    used = {t for n in nodes for t in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend([*kept, *halves.values()])
    return out, converted


def build_plan(
    onnx_path: Path,
    plan: Path,
    *,
    max_batch: int,
    max_seq: int,
    fp16: bool = True,
    workspace_gib: float = 4.0,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write `plan` (a serialized TensorRT engine for batch 1..max_batch, sequence
    1..max_seq) and its record `plan + ".json"`; return the record. `BackendUnavailable`
    without tensorrt or a GPU, `BuildError` when TensorRT cannot parse or build the graph."""
    say = echo or (lambda _m: None)
    if max_batch < 1 or max_seq < 1:
        raise BuildError(f"max_batch and max_seq must be >= 1, got {max_batch}, {max_seq}")
    trt = import_tensorrt()
    import torch

    started = time.perf_counter()
    model = onnx.load(str(onnx_path))
    converted: list[str] = []
    if fp16:
        model, converted = fp16_graph(model)
        say(f"{len(converted)} MatMul/Gemm nodes in fp16, the rest of the graph in fp32")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(3, parser.num_errors)))
        raise BuildError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name in INPUT_NAMES:
        profile.set_shape(name, (1, 1), (max_batch, max_seq), (max_batch, max_seq))
    config.add_optimization_profile(profile)
    say(f"building the TensorRT plan (batch 1..{max_batch}, sequence 1..{max_seq})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build {Path(onnx_path).name} (see its log above)")
    major, minor = torch.cuda.get_device_capability()
    record = {
        "tensorrt_version": str(trt.__version__),
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "precision": "fp16" if fp16 else "fp32",
        "fp16_nodes": len(converted),
        "max_batch": max_batch,
        "max_seq": max_seq,
        "onnx_sha256": sha256_file(Path(onnx_path)),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    plan.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((plan, bytes(memoryview(serialized))), (record_path(plan), b"")):
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data or (json.dumps(record, indent=2) + "\n").encode())
        os.replace(tmp, path)
    say(f"wrote {plan.name} in {record['build_seconds']} s")
    return record
