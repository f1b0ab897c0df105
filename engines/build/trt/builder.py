"""Build a TensorRT plan from the serving ONNX graph (export side; needs tensorrt and a GPU).

`build_engine` reads top-down: check the arguments -> import tensorrt, find the GPU ->
choose weak or strong typing -> parse the ONNX graph -> check its I/O -> optimization
profiles -> precision (FP16 with the FP32 pins of `engines.build.trt.precision`) -> build ->
write the plan and its JSON sidecar. Every decision is a pure function of this package;
what remains here is the sequence of library calls.

Typing: TensorRT 10 builds FP16 from a weakly typed network (`BuilderFlag.FP16`, with
`OBEY_PRECISION_CONSTRAINTS` and per-layer FP32 pins). TensorRT 11 removed those flags;
there the network is strongly typed and the FP16/FP32 split is written into the ONNX graph
first (`engines.build.trt.autocast`). `strongly_typed=None` picks whichever the library supports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engines.hashing import sha256_file
from engines.trt.errors import TensorRTBuildError
from engines.trt.lib import (
    LogSink,
    capture_errors,
    cuda_device,
    import_tensorrt,
    progress_or_log,
    shared_logger,
)
from engines.trt.meta import BuildInfo, write_atomic, write_sidecar
from engines.build.trt.precision import FLOAT_DTYPES, LayerInfo, fp32_layer_names
from engines.trt.profiles import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    Profile,
    dtype_name,
    enum_name,
    make_profiles,
)

__all__ = ["BuildInfo", "build_engine", "choose_strongly_typed", "describe_layer"]

# LayerType name -> the ILayer subclass whose `.op` names the operation.
_OP_CLASSES = {"ELEMENTWISE": "IElementWiseLayer", "UNARY": "IUnaryLayer", "REDUCE": "IReduceLayer"}


def choose_strongly_typed(requested: bool | None, *, fp16: bool, has_weak_flags: bool) -> bool:
    """Whether to build a strongly typed network.

    `has_weak_flags`: the library still has `BuilderFlag.FP16` (TensorRT 10; gone in 11).
    `None` picks weak typing where it exists (per-layer FP32 pins), strong elsewhere.
    """
    if requested is None:
        return not has_weak_flags
    if not requested and not has_weak_flags:
        if fp16:
            raise TensorRTBuildError(
                "this TensorRT has no weakly typed FP16 (BuilderFlag.FP16 was removed in "
                "TensorRT 11): build with strongly_typed=True or None"
            )
        return True  # every network is strongly typed there; an fp32 graph builds as fp32
    return requested


def check_network_io(inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """The parsed network must have exactly the serving graph's inputs and outputs."""
    if sorted(inputs) != sorted(INPUT_NAMES) or sorted(outputs) != sorted(OUTPUT_NAMES):
        raise TensorRTBuildError(
            f"the ONNX graph has inputs {list(inputs)} and outputs {list(outputs)}; the serving "
            f"graph needs inputs {list(INPUT_NAMES)} and outputs {list(OUTPUT_NAMES)}"
        )


def workspace_bytes(workspace_gib: float) -> int:
    if not workspace_gib > 0:
        raise ValueError(f"workspace_gib must be > 0, got {workspace_gib}")
    return int(workspace_gib * (1 << 30))


def describe_layer(trt: Any, layer: Any) -> LayerInfo:
    """A parsed network layer as plain data (name, type, operation, edges, dtypes)."""
    type_name = enum_name(layer.type)
    op: str | None = None
    cls = getattr(trt, _OP_CLASSES.get(type_name, ""), None)
    if cls is not None:
        try:  # the Python bindings hand out ILayer; the subclass view exposes `.op`
            layer.__class__ = cls
            op = enum_name(layer.op)
        except (AttributeError, TypeError):
            op = None
    inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
    outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
    return LayerInfo(
        name=str(layer.name),
        type=type_name,
        op=op,
        inputs=tuple(str(t.name) for t in inputs if t is not None),
        outputs=tuple(str(t.name) for t in outputs),
        output_dtypes=tuple(dtype_name(t.dtype) for t in outputs),
    )


def _add_profiles(builder: Any, config: Any, profiles: Sequence[Profile]) -> None:
    for p in profiles:
        shapes = builder.create_optimization_profile()
        lo, opt, hi = p.input_shapes()
        for name in INPUT_NAMES:
            shapes.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(shapes)


def _weakly_typed_fp16(
    trt: Any, network: Any, config: Any, fp32_layers: Sequence[str]
) -> tuple[str, ...]:
    """FP16 flag, then FP32 precision and output types on the pinned layers (obeyed)."""
    config.set_flag(trt.BuilderFlag.FP16)
    layers = [describe_layer(trt, network.get_layer(i)) for i in range(network.num_layers)]
    plan = fp32_layer_names(layers, fp32_layers)
    if plan.unmatched:
        raise TensorRTBuildError(f"fp32_layers name no layer of the network: {plan.unmatched}")
    if plan.fp32_layers:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = set(plan.fp32_layers)
        for i, info in enumerate(layers):
            if info.name not in keep:
                continue
            layer = network.get_layer(i)
            layer.precision = trt.float32
            for j, dtype in enumerate(info.output_dtypes):
                if dtype in FLOAT_DTYPES:
                    layer.set_output_type(j, trt.float32)
    return plan.fp32_layers


def _parse(trt: Any, parser: Any, onnx_path: Path, data: bytes | None, sink: LogSink) -> None:
    ok = (
        parser.parse(data, str(onnx_path))
        if data is not None
        else parser.parse_from_file(str(onnx_path))
    )
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        detail = "; ".join(errors[:3]) if errors else sink.summary()
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path.name}: {detail}")


def build_engine(
    onnx_path: Path,
    out_path: Path,
    *,
    max_batch: int,
    max_seq: int,
    fp16: bool = True,
    workspace_gib: float = 4,
    fp32_layers: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    seq_buckets: Sequence[int] = (),
    opt_batch: int | None = None,
    strongly_typed: bool | None = None,
    device_index: int = 0,
) -> BuildInfo:
    """Build `out_path` (a serialized TensorRT plan) and `out_path + ".json"` (its sidecar).

    The engine covers batch 1..max_batch and sequence 1..max_seq (one optimization profile
    per `seq_buckets` bucket). With `fp16`, matrix multiplications run in FP16 and the
    layers `engines.build.trt.precision` names, plus `fp32_layers`, stay FP32; an `fp32_layers`
    name that matches no layer is an error. Raises `TensorRTUnavailable` without tensorrt or
    a CUDA device, `TensorRTBuildError` when parsing or building fails, `ValueError` for
    bad arguments.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    say = progress_or_log(progress)
    profiles = make_profiles(max_batch, max_seq, seq_buckets=seq_buckets, opt_batch=opt_batch)
    pool = workspace_bytes(workspace_gib)
    if not onnx_path.is_file():
        raise TensorRTBuildError(f"ONNX graph not found: {onnx_path}")

    trt = import_tensorrt()
    device = cuda_device(device_index)
    strong = choose_strongly_typed(
        strongly_typed, fp16=fp16, has_weak_flags=hasattr(trt.BuilderFlag, "FP16")
    )
    import torch

    started = time.perf_counter()
    with torch.cuda.device(device.index), capture_errors() as sink:
        logger = shared_logger(trt)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)

        say(f"parsing {onnx_path.name} ({'strongly' if strong else 'weakly'} typed)")
        pinned: tuple[str, ...] = ()
        data: bytes | None = None
        if strong and fp16:
            import onnx

            from engines.build.trt.autocast import matmuls_to_fp16

            model, report = matmuls_to_fp16(onnx.load(str(onnx_path)), keep_fp32=fp32_layers)
            if report.unmatched:
                raise TensorRTBuildError(
                    f"fp32_layers name no MatMul/Gemm node: {report.unmatched}"
                )
            data, pinned = model.SerializeToString(), report.kept_fp32
            say(f"autocast: {len(report.converted)} MatMul/Gemm nodes in fp16")
        _parse(trt, parser, onnx_path, data, sink)
        check_network_io(
            [network.get_input(i).name for i in range(network.num_inputs)],
            [network.get_output(i).name for i in range(network.num_outputs)],
        )

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, pool)
        _add_profiles(builder, config, profiles)
        if fp16 and not strong:
            pinned = _weakly_typed_fp16(trt, network, config, fp32_layers)
            say(f"{network.num_layers} layers; {len(pinned)} pinned to fp32")

        say(f"building the plan: {len(profiles)} profile(s), max shape [{max_batch}, {max_seq}]")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTBuildError(f"TensorRT could not build {onnx_path.name}: {sink.summary()}")
        blob = bytes(memoryview(serialized))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, blob)
    info = BuildInfo(
        plan_path=out_path,
        tensorrt_version=str(trt.__version__),
        gpu_name=device.name,
        compute_capability=device.compute_capability,
        precision="fp16" if fp16 else "fp32",
        strongly_typed=strong,
        max_batch=max_batch,
        max_seq=max_seq,
        profiles=profiles,
        fp32_layers=pinned,
        onnx_sha256=sha256_file(onnx_path),
        plan_bytes=len(blob),
        build_seconds=round(time.perf_counter() - started, 3),
        workspace_gib=float(workspace_gib),
    )
    write_sidecar(info)
    say(f"wrote {out_path} ({len(blob) / 2**20:.1f} MiB) in {info.build_seconds:.0f} s")
    return info
