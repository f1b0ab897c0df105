"""Optimization profiles, shape checks, the dtype table and output shapes (pure; no tensorrt).

A TensorRT engine with dynamic shapes carries one or more optimization profiles: for each
input a (min, opt, max) shape. Inflow's two inputs (`input_ids`, `attention_mask`) always
share one shape [batch, seq], so a profile here is a batch range and a sequence range.
Several profiles split the sequence axis into buckets (e.g. 1..64 and 65..256): kernels are
tuned per bucket, and `select_profile` picks the bucket for a request.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.trt.errors import ShapeError, TensorRTLoadError
from engines.types import EMBEDDING_DIM

INPUT_NAMES: tuple[str, str] = ("input_ids", "attention_mask")
OUTPUT_NAMES: tuple[str, str] = ("probs", "embedding")

Shape = tuple[int, ...]
ShapeTriple = tuple[Shape, Shape, Shape]  # (min, opt, max), as TensorRT orders them


@dataclass(frozen=True, slots=True)
class Profile:
    """One optimization profile: every input is [batch, seq] within these ranges."""

    index: int
    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"profile {self.index}: need 1 <= min <= opt <= max batch: {self}")
        if not 1 <= self.min_seq <= self.opt_seq <= self.max_seq:
            raise ValueError(f"profile {self.index}: need 1 <= min <= opt <= max seq: {self}")

    def covers(self, batch: int, seq: int) -> bool:
        return self.min_batch <= batch <= self.max_batch and self.min_seq <= seq <= self.max_seq

    def input_shapes(self) -> ShapeTriple:
        """(min, opt, max) for each input, as `IOptimizationProfile.set_shape` takes them."""
        return (
            (self.min_batch, self.min_seq),
            (self.opt_batch, self.opt_seq),
            (self.max_batch, self.max_seq),
        )

    def to_json(self) -> dict[str, Any]:
        mn, opt, mx = self.input_shapes()
        return {"index": self.index, "min": list(mn), "opt": list(opt), "max": list(mx)}


def make_profiles(
    max_batch: int,
    max_seq: int,
    *,
    seq_buckets: Sequence[int] = (),
    opt_batch: int | None = None,
) -> tuple[Profile, ...]:
    """Profiles that together cover batch 1..max_batch and sequence 1..max_seq.

    `seq_buckets` are the upper bounds of the sequence buckets below `max_seq` (increasing;
    `max_seq` closes the last bucket). Bucket k covers (previous bound + 1)..bound, so
    exactly one profile covers any valid (batch, seq). Each profile's opt shape is
    (opt_batch or max_batch, the bucket's upper bound): the batcher pads to the longest
    text, so the upper bound is the shape a full bucket runs at.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if max_seq < 1:
        raise ValueError(f"max_seq must be >= 1, got {max_seq}")
    opt_b = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt_b <= max_batch:
        raise ValueError(f"opt_batch must be in 1..{max_batch}, got {opt_batch}")
    bounds = [int(b) for b in seq_buckets]
    if any(b < 1 or b > max_seq for b in bounds):
        raise ValueError(f"seq_buckets must lie in 1..{max_seq}, got {list(seq_buckets)}")
    if any(b2 <= b1 for b1, b2 in itertools.pairwise(bounds)):
        raise ValueError(f"seq_buckets must be strictly increasing, got {list(seq_buckets)}")
    if not bounds or bounds[-1] != max_seq:
        bounds.append(max_seq)
    profiles: list[Profile] = []
    low = 1
    for index, high in enumerate(bounds):
        profiles.append(Profile(index, 1, opt_b, max_batch, low, high, high))
        low = high + 1
    return tuple(profiles)


def max_shape(profiles: Sequence[Profile]) -> tuple[int, int]:
    """(max batch, max seq) over all profiles."""
    if not profiles:
        raise ValueError("an engine needs at least one optimization profile")
    return max(p.max_batch for p in profiles), max(p.max_seq for p in profiles)


def select_profile(profiles: Sequence[Profile], batch: int, seq: int) -> int:
    """Index of the profile to run (batch, seq) with: the one with the shortest covering
    sequence range (the tightest kernels), ties to the lower index."""
    covering = [p for p in profiles if p.covers(batch, seq)]
    if not covering:
        ranges = ", ".join(
            f"#{p.index} batch {p.min_batch}..{p.max_batch} seq {p.min_seq}..{p.max_seq}"
            for p in profiles
        )
        raise ShapeError(f"no optimization profile covers batch={batch}, seq={seq} ({ranges})")
    best = min(covering, key=lambda p: (p.max_seq - p.min_seq, p.index))
    return best.index


def check_request(
    ids_shape: Sequence[int], mask_shape: Sequence[int], *, max_batch: int, max_seq: int
) -> tuple[int, int]:
    """(batch, seq) of a request, or a `ShapeError` saying what is wrong and the limits."""
    if len(ids_shape) != 2:
        raise ShapeError(f"input_ids must be 2-D [batch, seq], got shape {tuple(ids_shape)}")
    if tuple(ids_shape) != tuple(mask_shape):
        raise ShapeError(
            f"input_ids {tuple(ids_shape)} and attention_mask {tuple(mask_shape)} differ in shape"
        )
    batch, seq = int(ids_shape[0]), int(ids_shape[1])
    if batch < 1 or seq < 1:
        raise ShapeError(f"empty request: batch={batch}, seq={seq}")
    if batch > max_batch:
        raise ShapeError(
            f"batch {batch} exceeds the engine's max_batch {max_batch}: split the batch "
            "or rebuild the engine with a larger max_batch"
        )
    if seq > max_seq:
        raise ShapeError(
            f"sequence length {seq} exceeds the engine's max_seq {max_seq}: truncate to "
            f"{max_seq} tokens or rebuild the engine with a larger max_seq"
        )
    return batch, seq


def profiles_from_engine(
    per_profile: Sequence[Mapping[str, Sequence[Sequence[int]]]],
) -> tuple[Profile, ...]:
    """Profiles read back from a built engine.

    `per_profile[k][name]` is `engine.get_tensor_profile_shape(name, k)` for each input
    name, as plain int tuples. Both inputs must have the same rank-2 ranges.
    """
    profiles: list[Profile] = []
    for index, shapes in enumerate(per_profile):
        missing = [n for n in INPUT_NAMES if n not in shapes]
        if missing:
            raise TensorRTLoadError(f"profile {index} lacks shapes for inputs {missing}")
        triple = tuple(tuple(int(d) for d in s) for s in shapes[INPUT_NAMES[0]])
        other = tuple(tuple(int(d) for d in s) for s in shapes[INPUT_NAMES[1]])
        if triple != other:
            raise TensorRTLoadError(
                f"profile {index}: input_ids {triple} and attention_mask {other} ranges differ"
            )
        if len(triple) != 3 or any(len(s) != 2 for s in triple):
            raise TensorRTLoadError(
                f"profile {index}: expected (min, opt, max) of [b, s]: {triple}"
            )
        (b0, s0), (b1, s1), (b2, s2) = triple
        try:
            profiles.append(Profile(index, b0, b1, b2, s0, s1, s2))
        except ValueError as exc:
            raise TensorRTLoadError(str(exc)) from exc
    if not profiles:
        raise TensorRTLoadError("the engine has no optimization profile")
    return tuple(profiles)


# --- dtypes -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DTypeInfo:
    """What a TensorRT `DataType` (keyed by its `.name`) is in numpy and torch."""

    name: str  # TensorRT's enum member name, e.g. "HALF"
    numpy: str | None  # numpy dtype name, None where numpy has none (bf16, fp8, int4, ...)
    torch: str | None  # attribute of the torch module, e.g. "float16"
    itemsize: int  # bytes per element (0 for sub-byte types)


DTYPES: Mapping[str, DTypeInfo] = {
    info.name: info
    for info in (
        DTypeInfo("FLOAT", "float32", "float32", 4),
        DTypeInfo("HALF", "float16", "float16", 2),
        DTypeInfo("BF16", None, "bfloat16", 2),
        DTypeInfo("INT8", "int8", "int8", 1),
        DTypeInfo("UINT8", "uint8", "uint8", 1),
        DTypeInfo("INT32", "int32", "int32", 4),
        DTypeInfo("INT64", "int64", "int64", 8),
        DTypeInfo("BOOL", "bool", "bool", 1),
        DTypeInfo("FP8", None, "float8_e4m3fn", 1),
        DTypeInfo("INT4", None, None, 0),
        DTypeInfo("FP4", None, None, 0),
    )
}

INPUT_DTYPES = frozenset({"INT32", "INT64"})  # what token ids / masks may arrive as
OUTPUT_DTYPES = frozenset({"FLOAT", "HALF"})  # what probs / embedding may leave as


def enum_name(value: object) -> str:
    """The member name of a TensorRT (pybind11) enum value: its `.name`, else the text after
    the last dot of `str()` ("DataType.HALF" -> "HALF", "TensorIOMode.INPUT" -> "INPUT")."""
    name = getattr(value, "name", None)
    if isinstance(name, str) and name:
        return name
    return str(value).rsplit(".", 1)[-1]


def dtype_name(trt_dtype: object) -> str:
    """The `DTYPES` key of a TensorRT dtype (`trt.float16` -> "HALF")."""
    return enum_name(trt_dtype)


def dtype_info(name: str) -> DTypeInfo:
    try:
        return DTYPES[name]
    except KeyError:
        raise TensorRTLoadError(f"unknown TensorRT dtype {name!r}") from None


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a TensorRT dtype name; `TensorRTLoadError` where numpy has none."""
    info = dtype_info(name)
    if info.numpy is None:
        raise TensorRTLoadError(f"TensorRT dtype {name} has no numpy equivalent")
    return np.dtype(info.numpy)


def torch_dtype(name: str) -> Any:
    """The torch dtype for a TensorRT dtype name (imports torch)."""
    info = dtype_info(name)
    if info.torch is None:
        raise TensorRTLoadError(f"TensorRT dtype {name} has no torch equivalent")
    import torch

    return getattr(torch, info.torch)


# --- outputs ----------------------------------------------------------------------------


def output_shape(name: str, batch: int, num_labels: int) -> Shape:
    """Shape of an output for a batch: probs [b, num_labels], embedding [b, 384]."""
    if name == "probs":
        return (batch, num_labels)
    if name == "embedding":
        return (batch, EMBEDDING_DIM)
    raise ValueError(f"unknown output {name!r}; the serving graph has {OUTPUT_NAMES}")
