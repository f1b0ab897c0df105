"""The I/O layout of a TensorRT engine and the per-request binding decisions (pure).

The backend reads each I/O tensor's name, mode, dtype and declared shape from the engine
into `TensorSpec`s; `check_io` holds them to the serving-graph contract
(`engines/backends/base.py`) and answers everything the run loop needs: buffer sizes,
the host dtype of each input, the shape of each output for a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.trt.errors import ShapeError, TensorRTLoadError
from engines.trt.profiles import (
    INPUT_DTYPES,
    INPUT_NAMES,
    OUTPUT_DTYPES,
    OUTPUT_NAMES,
    Shape,
    numpy_dtype,
    output_shape,
)
from engines.types import EMBEDDING_DIM

_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One I/O tensor as the engine declares it (-1 marks a dynamic dimension)."""

    name: str
    is_input: bool
    dtype: str  # TensorRT dtype name, a key of `profiles.DTYPES`
    shape: Shape


@dataclass(frozen=True, slots=True)
class IOLayout:
    """The engine's I/O tensors in contract order, and the label count its head has."""

    inputs: tuple[TensorSpec, ...]  # input_ids, attention_mask
    outputs: tuple[TensorSpec, ...]  # probs, embedding
    num_labels: int

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    def buffer_shapes(self, max_batch: int, max_seq: int) -> dict[str, Shape]:
        """The shape each device buffer is allocated at (the largest any request needs)."""
        shapes: dict[str, Shape] = {spec.name: (max_batch, max_seq) for spec in self.inputs}
        for spec in self.outputs:
            shapes[spec.name] = output_shape(spec.name, max_batch, self.num_labels)
        return shapes

    def output_shapes(self, batch: int) -> dict[str, Shape]:
        return {s.name: output_shape(s.name, batch, self.num_labels) for s in self.outputs}


def check_io(specs: Sequence[TensorSpec]) -> IOLayout:
    """Hold an engine's I/O tensors to the serving-graph contract, or raise `TensorRTLoadError`
    naming every difference."""
    by_name = {s.name: s for s in specs}
    problems: list[str] = []
    want_in, want_out = set(INPUT_NAMES), set(OUTPUT_NAMES)
    got_in = {s.name for s in specs if s.is_input}
    got_out = {s.name for s in specs if not s.is_input}
    if got_in != want_in:
        problems.append(f"inputs are {sorted(got_in)}, expected {sorted(want_in)}")
    if got_out != want_out:
        problems.append(f"outputs are {sorted(got_out)}, expected {sorted(want_out)}")
    if problems:
        raise TensorRTLoadError(
            "engine I/O does not match the serving graph: " + "; ".join(problems)
        )

    num_labels = -1
    for name in INPUT_NAMES:
        spec = by_name[name]
        if spec.dtype not in INPUT_DTYPES:
            problems.append(f"{name} is {spec.dtype}, expected one of {sorted(INPUT_DTYPES)}")
        if len(spec.shape) != 2:
            problems.append(f"{name} has shape {spec.shape}, expected [batch, seq]")
    for name in OUTPUT_NAMES:
        spec = by_name[name]
        if spec.dtype not in OUTPUT_DTYPES:
            problems.append(f"{name} is {spec.dtype}, expected one of {sorted(OUTPUT_DTYPES)}")
        if len(spec.shape) != 2:
            problems.append(f"{name} has shape {spec.shape}, expected 2-D [batch, n]")
            continue
        width = spec.shape[1]
        if name == "embedding" and width != EMBEDDING_DIM:
            problems.append(f"embedding width is {width}, expected {EMBEDDING_DIM}")
        if name == "probs":
            if width < 1:
                problems.append(f"probs width must be static and >= 1, got {width}")
            num_labels = width
    if problems:
        raise TensorRTLoadError(
            "engine I/O does not match the serving graph: " + "; ".join(problems)
        )
    return IOLayout(
        inputs=tuple(by_name[n] for n in INPUT_NAMES),
        outputs=tuple(by_name[n] for n in OUTPUT_NAMES),
        num_labels=num_labels,
    )


def to_input_dtype(array: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    """A C-contiguous copy/view of a token array in the dtype the engine declares.

    int64 -> int32 (what TensorRT often makes of ONNX int64 inputs) checks the range first:
    a silent wrap-around would turn a bad id into a valid one.
    """
    if not np.issubdtype(array.dtype, np.integer):
        raise ShapeError(f"token arrays must hold integers, got {array.dtype}")
    target = numpy_dtype(dtype)
    if target == np.int32 and array.size and array.dtype.itemsize > 4:
        lo, hi = int(array.min()), int(array.max())
        if lo < _INT32.min or hi > _INT32.max:
            raise ShapeError(f"token values {lo}..{hi} do not fit the engine's int32 inputs")
    return np.ascontiguousarray(array, dtype=target)


def to_float32(arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[np.float32]]:
    """Owned float32 copies of host output views (the views' memory is reused next run)."""
    return {name: np.array(a, dtype=np.float32, copy=True) for name, a in arrays.items()}
