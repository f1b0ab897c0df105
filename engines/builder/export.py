"""torch -> ONNX export of the serving graph, INT8 dynamic quantization, cached per model.

Outputs (under `<model dir>/export/`, keyed by the model's content hash):
  fp32.onnx        the plain graph of standard ops, one self-contained file
  fp32-fused.onnx  onnxruntime's BERT fusions applied (Attention, EmbedLayerNorm, BiasGelu;
                   residual Add + LayerNormalization stay two ops, see fuse_for_onnxruntime)
  int8.onnx        dynamic INT8 of the fused graph's MatMuls and Attention, per-channel
                   weights, the widest input channels of each feed-forward down-projection
                   in fp32 (default settings of quantize_dynamic change ~15% of labels)
FP16 is not produced for CPU (no speed-up in onnxruntime's CPU EP); TensorRT builds its
FP16 engine from fp32.onnx. Export code: never imported by the serving path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.errors import BuildError
from engines.modeldir import (
    TASK_EMBEDDING,
    ModelInfo,
    attention_heads,
    hidden_size,
    read_model,
)
from engines.tokenize import DEFAULT_MAX_SEQ_LEN, Encoded, Tokenizer

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("probs", "embedding")
OPSET = 17
EXPORT_FORMAT = 7  # bump to invalidate cached exports when the recipe changes
OUTLIER_CHANNELS = 4  # input channels of each down-projection kept fp32 (split_outlier_channels)
CALIBRATION_TEXTS = 256  # training texts that pick them
INT8_SETTINGS: dict[str, Any] = {
    "op_types_to_quantize": ["MatMul", "Attention"],
    "per_channel": True,
    "fp32_outlier_channels": OUTLIER_CHANNELS,
    "calibration_texts": CALIBRATION_TEXTS,
}

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Silence torch.onnx's registration chatter and quantize_dynamic's root-logger advice."""
    names = ("torch.onnx", "torch.export", "onnxscript", "")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _stamp(info: ModelInfo, variant: str) -> dict[str, Any]:
    return {
        "model_hash": info.hash,
        "precision": variant,
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "int8": INT8_SETTINGS if variant == "int8" else None,
    }


def _cached(path: Path, stamp: dict[str, Any]) -> bool:
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        return False
    try:
        return bool(json.loads(meta.read_text()) == stamp)
    except ValueError:
        return False


def _write_stamp(path: Path, stamp: dict[str, Any]) -> None:
    meta = path.with_suffix(".json")
    tmp = meta.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp, meta)


def _rename(graph: Any, old: str, new: str) -> None:
    """Rename one value everywhere in a graph (node I/O, graph I/O, value_info, initializers)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for coll in (graph.input, graph.output, graph.value_info):
        for vi in coll:
            if vi.name == old:
                vi.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def name_outputs(graph: Any, wanted: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Give the graph outputs their contract names, moving aside internal values that
    already carry those names (the dynamo exporter names aten::embedding's output
    "embedding", which clashes with our output of the same name)."""
    current = [o.name for o in graph.output]
    if len(current) != len(wanted):
        raise BuildError(f"exported graph has outputs {current}, expected {list(wanted)}")
    for target in wanted:
        if target not in current:
            taken = any(target in n.output for n in graph.node) or any(
                i.name == target for i in graph.initializer
            )
            if taken:
                _rename(graph, target, f"{target}__internal")
    for old, new in zip([o.name for o in graph.output], wanted, strict=True):
        if old != new:
            _rename(graph, old, new)


def export_module(
    module: Any, out_path: Path, opset: int = OPSET, outputs: tuple[str, ...] = OUTPUT_NAMES
) -> Path:
    """Export a serving module to one self-contained ONNX file.

    Inputs input_ids/attention_mask int64 [batch, seq] (both axes dynamic); outputs
    probs [batch, num_labels] and embedding [batch, hidden], or (`outputs=("embedding",)`,
    a module returning one tensor) embedding alone.
    """
    import onnx
    import torch

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with _quiet_logs():
            try:
                # The TorchScript exporter, not dynamo: its BERT graph is the one that
                # onnxruntime's transformer optimizer recognises (fused Attention, BiasGelu),
                # measured ~10-15% faster for INT8 here than the dynamo graph, which fuses nothing.
                torch.onnx.export(
                    module,
                    (ids, mask),
                    str(raw),
                    input_names=list(INPUT_NAMES),
                    output_names=[f"serving_{name}_out" for name in outputs],
                    dynamic_axes={
                        "input_ids": {0: "batch", 1: "seq"},
                        "attention_mask": {0: "batch", 1: "seq"},
                        **{f"serving_{name}_out": {0: "batch"} for name in outputs},
                    },
                    opset_version=opset,
                    dynamo=False,
                )
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BuildError(f"ONNX export failed: {first}") from exc
        proto = onnx.load(str(raw), load_external_data=True)
        name_outputs(proto.graph, outputs)
        onnx.checker.check_model(proto)
        staged = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(staged), save_as_external_data=False)
        os.replace(staged, out_path)
    return out_path


def fuse_for_onnxruntime(
    fp32_path: Path, out_path: Path, num_heads: int, hidden_size: int
) -> dict[str, int]:
    """onnxruntime's BERT fusions (Attention, EmbedLayerNormalization, BiasGelu): contrib ops
    only onnxruntime runs, so TensorRT keeps the plain graph.

    Not SkipLayerNormalization: its CPU kernel (onnxruntime 1.32) took 5-6x as long as the
    Add + LayerNormalization it replaces at every shape measured (12 norms of [1, 34, 384]:
    0.82 against 0.17 ms; [32, 128, 384]: 98 against 16 ms, one thread), 16 % of the INT8
    engine's time on tweets. The CPU session keeps it unfused too
    (engines.backends.onnxruntime.CPU_DISABLED_OPTIMIZERS)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    with _quiet_logs():
        try:
            # Given, not detected (0): detection from the graph misses the Attention fusion.
            model = optimize_model(
                str(fp32_path),
                model_type="bert",
                num_heads=num_heads,
                hidden_size=hidden_size,
                opt_level=0,
                optimization_options=options,
            )
        except Exception as exc:
            raise BuildError(f"onnxruntime fusion failed: {str(exc).splitlines()[0]}") from exc
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        staged = Path(tmp) / "fused.onnx"
        model.save_model_to_file(str(staged))
        os.replace(staged, out_path)
    return stats


def down_projections(graph: Any, hidden: int) -> list[Any]:
    """The feed-forward down-projections: MatMul nodes whose weight is [intermediate, hidden]
    with intermediate > hidden (a classifier head's [hidden, labels] is not one)."""
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        dims = shapes.get(node.input[1])
        if dims is not None and len(dims) == 2 and dims[1] == hidden and dims[0] > hidden:
            found.append(node)
    return found


def channel_ranges(
    fp32_path: Path, tensors: Sequence[str], batches: Sequence[Encoded]
) -> list[npt.NDArray[np.float32]]:
    """The largest |value| of each channel (last axis) of each named tensor of the graph, over
    the real (unpadded) tokens of `batches`."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(fp32_path))
    for name in tensors:
        proto.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ranges: list[npt.NDArray[np.float32]] = []
    for batch in batches:
        outputs = session.run(
            list(tensors),
            {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
        )
        real = batch.attention_mask.reshape(-1) == 1
        widest = [np.abs(v.reshape(-1, v.shape[-1])[real]).max(axis=0) for v in outputs]
        ranges = (
            widest
            if not ranges
            else [np.maximum(r, w) for r, w in zip(ranges, widest, strict=True)]
        )
    return ranges


def split_outlier_channels(
    graph: Any, projections: Sequence[Any], ranges: Sequence[npt.NDArray[np.float32]], k: int
) -> list[str]:
    """Rewrite each down-projection `X @ W` as `(X * m) @ W_in + X[..., o] @ W[o]`: the `k`
    input channels `o` with the widest calibration ranges go through a small fp32 MatMul, the
    others (m zeroes `o`; W_in has their rows zeroed) through the one that INT8 quantizes.
    Returns the names of the fp32 MatMuls, for the quantizer to leave alone.

    Why: these MatMuls read GELU outputs, where one or two channels reach 4x the range of
    every other (MiniLM-L6 layer 0: 24.4 against at most 6.3), and one per-tensor dynamic
    scale for all of them leaves the other channels few levels. The sentiment model's parity
    gate (500 validation tweets against torch fp32): with the former recipe (the first three
    down-projections wholly fp32, 27 % of the engine's time) label agreement 0.972, embedding
    cosine min 0.989, max |dp| 0.17; with this split (k=4, all six) 0.978, 0.990 and 0.09, and
    12-25 % more texts/s at batches of 1, 8 and 32 (`inflow engine bench`, interleaved). All
    MatMuls INT8 without a split: agreement 0.968, cosine min 0.984 (against onnxruntime fp32)."""
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in graph.initializer}
    kept: list[str] = []
    for node, widest in zip(projections, ranges, strict=True):
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        outliers = np.sort(np.argsort(-widest)[: max(1, min(k, w.shape[0] // 8))])
        mask = np.ones(w.shape[0], dtype=np.float32)
        mask[outliers] = 0.0
        base = node.name or node.output[0]
        names = {
            part: f"{base}/outliers_{part}" for part in ("mask", "idx", "w", "x", "y", "in", "yin")
        }
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * mask[:, None], node.input[1]))
        graph.initializer.extend(
            [
                numpy_helper.from_array(mask, names["mask"]),
                numpy_helper.from_array(outliers.astype(np.int64), names["idx"]),
                numpy_helper.from_array(w[outliers], names["w"]),
            ]
        )
        x, y = node.input[0], node.output[0]
        fp32 = f"{base}/outliers_fp32"
        replacement = [
            helper.make_node("Mul", [x, names["mask"]], [names["in"]], name=f"{base}/inliers"),
            helper.make_node("MatMul", [names["in"], node.input[1]], [names["yin"]], name=base),
            helper.make_node(
                "Gather", [x, names["idx"]], [names["x"]], name=f"{base}/gather", axis=-1
            ),
            helper.make_node("MatMul", [names["x"], names["w"]], [names["y"]], name=fp32),
            helper.make_node("Add", [names["yin"], names["y"]], [y], name=f"{base}/sum"),
        ]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new_node in enumerate(replacement):
            graph.node.insert(at + offset, new_node)
        kept.append(fp32)
    return kept


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    hidden: int,
    calibration: Sequence[Encoded] = (),
    outlier_channels: int = OUTLIER_CHANNELS,
) -> Path:
    """Dynamic INT8 quantization of the MatMuls (per-channel weights); with `calibration`
    batches, the widest input channels of each down-projection stay fp32
    (`split_outlier_channels`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=Path(out_path).parent) as tmp:
        proto = onnx.load(str(fp32_path))
        del proto.graph.value_info[:]  # stale shapes make quantize_dynamic's inference fail
        exclude: list[str] = []
        projections = down_projections(proto.graph, hidden)
        if calibration and projections and outlier_channels > 0:
            ranges = channel_ranges(fp32_path, [n.input[0] for n in projections], calibration)
            exclude = split_outlier_channels(proto.graph, projections, ranges, outlier_channels)
        clean = Path(tmp) / "clean.onnx"
        onnx.save_model(proto, str(clean))
        staged = Path(tmp) / "int8.onnx"
        try:
            with _quiet_logs():
                quantize_dynamic(
                    str(clean),
                    str(staged),
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(INT8_SETTINGS["op_types_to_quantize"]),
                    per_channel=bool(INT8_SETTINGS["per_channel"]),
                    nodes_to_exclude=exclude,
                    # Fused contrib ops (Attention, BiasGelu ...) defeat its type inference.
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        except Exception as exc:
            raise BuildError(f"INT8 quantization failed: {str(exc).splitlines()[0]}") from exc
        folded = onnx.load(str(staged), load_external_data=True)
        onnx.save_model(folded, str(Path(tmp) / "final.onnx"), save_as_external_data=False)
        os.replace(Path(tmp) / "final.onnx", out_path)
    return Path(out_path)


def calibration_batches(info: ModelInfo, n: int = CALIBRATION_TEXTS) -> list[Encoded]:
    """Training texts of the model's dataset, tokenized as the engine will, in batches of 16."""
    from engines.builder.data import dataset_of, training_texts

    texts = training_texts(n, dataset_of(info.meta.get("train", {}).get("source")))
    tokenizer = Tokenizer(info.tokenizer_path, min(info.max_seq_len, DEFAULT_MAX_SEQ_LEN))
    return [tokenizer.encode(texts[i : i + 16]) for i in range(0, len(texts), 16)]


def _encoder_config(info: ModelInfo) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((info.encoder_path() / "config.json").read_text())
    return config


def export_model(
    model: Path | ModelInfo, precision: str = "fp32", progress: bool = True, fused: bool = False
) -> Path:
    """The ONNX file of a model folder, exported once and cached by the model's hash.

    precision 'fp32': the plain graph of standard ops (TensorRT builds from it), or with
    `fused` the onnxruntime-fused graph; 'int8': dynamic INT8 of the fused graph.
    Cached in `<model dir>/export/{fp32,fp32-fused,int8}.onnx` with a stamp.
    """
    info = model if isinstance(model, ModelInfo) else read_model(Path(model))
    if precision not in ("fp32", "int8"):
        raise BuildError(
            f"no {precision} ONNX variant for CPU: use fp32 or int8 "
            "(fp16 engines are built by TensorRT from the fp32 ONNX)"
        )
    variant = "fp32-fused" if precision == "fp32" and fused else precision
    out_dir = info.export_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{variant}.onnx"
    stamp = _stamp(info, variant)
    if _cached(out, stamp):
        return out
    say = print if progress else (lambda *_a: None)
    if variant == "fp32":
        from engines.builder.model import EmbeddingOnly, load_serving_model

        say(f"exporting {info.name} ({info.short_hash}) to ONNX fp32 ...")
        module = load_serving_model(info)
        if info.task == TASK_EMBEDDING:
            export_module(EmbeddingOnly(module), out, outputs=("embedding",))
        else:
            export_module(module, out)
    elif variant == "fp32-fused":
        plain = export_model(info, "fp32", progress)
        say(f"fusing {info.name} ({info.short_hash}) for onnxruntime ...")
        config = _encoder_config(info)
        try:
            stats = fuse_for_onnxruntime(plain, out, attention_heads(config), hidden_size(config))
        except BuildError as exc:
            # Fusion is a speed-up, not a requirement: encoders it does not recognise run
            # the plain graph of standard ops.
            say(f"  not fused ({exc}): using the plain graph")
            shutil.copyfile(plain, out)
        else:
            say("  fused: " + ", ".join(f"{op} x{n}" for op, n in sorted(stats.items())))
    else:
        fp32 = export_model(info, "fp32", progress, fused=True)
        say(f"quantizing {info.name} ({info.short_hash}) to INT8 ...")
        config = _encoder_config(info)
        quantize_int8(fp32, out, hidden_size(config), calibration_batches(info))
    _write_stamp(out, stamp)
    return out


def clear_cache(model: Path | ModelInfo) -> None:
    info = model if isinstance(model, ModelInfo) else read_model(Path(model))
    shutil.rmtree(info.export_dir, ignore_errors=True)
