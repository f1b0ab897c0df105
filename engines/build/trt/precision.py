"""Which layers of an FP16 engine stay in FP32 (pure: layer lists are plain data).

FP16 holds magnitudes up to 65504 and about 3 significant digits. In a BERT encoder the
parts that break in FP16 are well known, and standard practice keeps them in FP32:

- softmax (attention and the classification head): exp() overflows, and small
  probabilities underflow;
- layer normalisation: the variance is a mean of squares (Pow/ReduceMean) that overflows,
  and its epsilon (1e-12) is below FP16's smallest subnormal; a fused TensorRT
  `NORMALIZATION` layer or the decomposed ReduceMean/Sub/Pow/Add/Sqrt/Div chain;
- the L2 norm of the embedding (ReduceSum of squares / Sqrt / Div) and the masked mean
  pooling (ReduceSum / Div) before it.

The matrix multiplications (nearly all of the time) stay in FP16. `fp32_layer_names` pins
the layers above by kind, then the cheap layers that sit on a short path between two pinned
layers (the `Sub` between ReduceMean and Pow, the `+ eps` between ReduceMean and Sqrt, the
`Max(norm, eps)` before the Div), then whatever names the caller adds, typically from a
CPU FP16-emulation parity check (`overflow_layers`).

Layers are described either as TensorRT layers (`type` = `LayerType` name such as
"ELEMENTWISE", `op` = the ElementWise/Unary/Reduce operation name such as "POW") or as ONNX
nodes (`type` = op_type such as "Pow", `op` = None); the rules accept both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

FP16_MAX = 65504.0

FLOAT_DTYPES = frozenset({"FLOAT", "HALF", "BF16"})

# TensorRT LayerType names and ONNX op_types (upper-cased) that are always pinned.
_PIN_TYPES = frozenset({"SOFTMAX", "NORMALIZATION", "LAYERNORMALIZATION", "REDUCE"})
_PIN_ELEMENTWISE = frozenset({"POW", "DIV"})
_PIN_UNARY = frozenset({"SQRT", "EXP", "RECIP", "RECIPROCAL", "LOG"})
_PIN_ONNX = _PIN_ELEMENTWISE | _PIN_UNARY | {"LOGSOFTMAX"}
# Layers that are never pinned: type conversions and shape plumbing (their "precision" is
# their output type; a constraint there can make TensorRT reject the network).
_NEVER_PIN = frozenset({"CAST", "IDENTITY", "SHAPE", "CONSTANT", "ASSERTION", "QUANTIZE",
                        "DEQUANTIZE"})  # fmt: skip
# Layers the chain rule never pulls into FP32: the expensive ones FP16 is for.
_HEAVY = frozenset(
    {
        "MATRIX_MULTIPLY",
        "MATMUL",
        "GEMM",
        "CONVOLUTION",
        "CONV",
        "DECONVOLUTION",
        "CONVTRANSPOSE",
        "FULLY_CONNECTED",
        "EINSUM",
        "ATTENTION",
    }
)


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One layer of a parsed network (or one ONNX node), as plain data."""

    name: str
    type: str  # TensorRT LayerType name ("SOFTMAX") or ONNX op_type ("Softmax")
    op: str | None = None  # ElementWise/Unary/Reduce operation name ("POW"), if any
    inputs: tuple[str, ...] = ()  # names of the tensors it reads
    outputs: tuple[str, ...] = ()  # names of the tensors it writes
    output_dtypes: tuple[str, ...] = ()  # TensorRT dtype names; empty when not known

    @property
    def is_float(self) -> bool:
        """Whether precision matters for it (shape arithmetic in int64 does not)."""
        return not self.output_dtypes or any(d in FLOAT_DTYPES for d in self.output_dtypes)

    @property
    def is_heavy(self) -> bool:
        return _key(self.type) in _HEAVY

    @property
    def pinnable(self) -> bool:
        return self.is_float and _key(self.type) not in _NEVER_PIN


@dataclass(frozen=True, slots=True)
class PrecisionPlan:
    """The layers to pin to FP32, in network order, each with why."""

    fp32_layers: tuple[str, ...]
    reasons: Mapping[str, str] = field(default_factory=dict)
    unmatched: tuple[str, ...] = ()  # caller-given names that matched no layer


def _key(text: str | None) -> str:
    return (text or "").upper()


def pin_reason(layer: LayerInfo) -> str | None:
    """Why this layer is pinned by kind alone, or None."""
    if not layer.pinnable:
        return None
    kind, op = _key(layer.type), _key(layer.op)
    if kind in _PIN_TYPES:
        return f"{kind.lower()} in fp32"
    if kind.startswith("REDUCE"):  # ONNX ReduceMean, ReduceSum, ReduceL2, ...
        return f"{kind.lower()} in fp32"
    if kind == "ELEMENTWISE" and op in _PIN_ELEMENTWISE:
        return f"elementwise {op.lower()} in fp32"
    if kind == "UNARY" and op in _PIN_UNARY:
        return f"unary {op.lower()} in fp32"
    if kind in _PIN_ONNX:
        return f"{kind.lower()} in fp32"
    return None


def _bridges(layers: Sequence[LayerInfo], seeds: set[int], max_gap: int) -> set[int]:
    """Cheap float layers on a path of at most `max_gap` layers between two seed layers."""
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        for t in layer.outputs:
            producer[t] = i
        for t in layer.inputs:
            consumers.setdefault(t, []).append(i)

    def passable(i: int) -> bool:
        return i not in seeds and not layers[i].is_heavy and layers[i].pinnable

    def successors(i: int) -> Iterable[int]:
        for t in layers[i].outputs:
            yield from consumers.get(t, ())

    def predecessors(i: int) -> Iterable[int]:
        for t in layers[i].inputs:
            if t in producer:
                yield producer[t]

    def distances(forward: bool) -> dict[int, int]:
        nexts = successors if forward else predecessors
        dist: dict[int, int] = {}
        queue: deque[int] = deque()
        for s in seeds:
            for n in nexts(s):
                if passable(n) and n not in dist:
                    dist[n] = 1
                    queue.append(n)
        while queue:
            i = queue.popleft()
            if dist[i] >= max_gap:
                continue
            for n in nexts(i):
                if passable(n) and n not in dist:
                    dist[n] = dist[i] + 1
                    queue.append(n)
        return dist

    fwd, bwd = distances(True), distances(False)
    return {i for i in fwd.keys() & bwd.keys() if fwd[i] + bwd[i] - 1 <= max_gap}


def _match(layers: Sequence[LayerInfo], requested: Iterable[str]) -> tuple[set[int], list[str]]:
    """Indices of layers named by the caller: exactly, or a layer TensorRT derived from that
    ONNX node (the parser names extra layers `<node>_<n>`)."""
    found: set[int] = set()
    unmatched: list[str] = []
    for name in dict.fromkeys(requested):
        hits = {i for i, layer in enumerate(layers) if layer.name == name}
        if not hits:
            hits = {i for i, layer in enumerate(layers) if layer.name.startswith(name + "_")}
        if hits:
            found |= hits
        else:
            unmatched.append(name)
    return found, unmatched


def fp32_layer_names(
    layers: Sequence[LayerInfo], extra: Iterable[str] = (), *, max_gap: int = 2
) -> PrecisionPlan:
    """The FP32 plan for a network: pinned kinds, short bridges between them, and the
    caller's `extra` names (see the module docstring). Casts, constants and shape layers
    are never pinned; a cast in a chain ends the bridge."""
    reasons: dict[int, str] = {}
    for i, layer in enumerate(layers):
        why = pin_reason(layer)
        if why is not None:
            reasons[i] = why
    if reasons and max_gap > 0:
        for i in _bridges(layers, set(reasons), max_gap):
            reasons.setdefault(i, "between fp32 layers")
    found, unmatched = _match(layers, extra)
    for i in found:
        reasons.setdefault(i, "requested (fp16 parity check)")
    order = sorted(reasons)
    return PrecisionPlan(
        fp32_layers=tuple(layers[i].name for i in order),
        reasons={layers[i].name: reasons[i] for i in order},
        unmatched=tuple(unmatched),
    )


def overflow_layers(
    max_abs: Mapping[str, float], *, limit: float = FP16_MAX, headroom: float = 1.0
) -> list[str]:
    """Names whose largest |activation| (from an FP32 run over calibration text) would not
    fit FP16: above `limit / headroom` (headroom 2 keeps a 2x margin). Sorted by name."""
    if headroom < 1.0:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    bound = limit / headroom
    return sorted(n for n, v in max_abs.items() if not abs(v) <= bound)  # NaN counts


_ONNX_DTYPES = {
    1: "FLOAT",
    2: "UINT8",
    3: "INT8",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    10: "HALF",
    16: "BF16",
}


def layers_from_onnx(model: onnx.ModelProto) -> list[LayerInfo]:
    """The nodes of an ONNX graph as `LayerInfo`s (dtypes from shape inference, when it
    succeeds). Node names must be unique and non-empty for the result to be useful."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a nicety here; the names and edges suffice
        inferred = model
    graph = inferred.graph
    types: dict[str, int] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    out: list[LayerInfo] = []
    for node in graph.node:
        dtypes = tuple(_ONNX_DTYPES.get(types.get(o, 0), "") for o in node.output)
        out.append(
            LayerInfo(
                name=node.name,
                type=node.op_type,
                inputs=tuple(t for t in node.input if t),
                outputs=tuple(node.output),
                output_dtypes=() if "" in dtypes else dtypes,
            )
        )
    return out
