"""The one interface every runtime implements (onnxruntime, tensorrt, torch).

The serving graph is the same for all runtimes (see `engines/export.py`):
  inputs : input_ids int64 [batch, seq], attention_mask int64 [batch, seq]
  outputs: probs float32 [batch, num_labels] (softmax; absent for an embedder, whose
           backend returns [batch, 0]), embedding float32 [batch, width]
A backend receives already-tokenized, already-padded arrays and returns both outputs,
row i answering input row i. It never tokenizes, batches or queues: that is the router's job.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


def check_batch_shape(input_ids: Int64Array, max_batch: int, max_seq: int) -> None:
    """Refuse a batch larger than the shapes the backend was built for."""
    n, seq = input_ids.shape
    if n > max_batch or seq > max_seq:
        raise ValueError(f"batch {n}x{seq} exceeds the engine's {max_batch}x{max_seq}")


class Backend(Protocol):
    name: str  # "onnxruntime" | "tensorrt" | "torch"
    precision: str  # "fp32" | "fp16" | "int8"
    concurrent_runs: int  # how many `run` calls may execute at once, from as many threads

    @property
    def max_batch_size(self) -> int: ...

    @property
    def max_seq_len(self) -> int: ...

    def run(
        self, input_ids: Int64Array, attention_mask: Int64Array
    ) -> tuple[Float32Array, Float32Array]:
        """Return (probs [n, num_labels], embedding [n, width]) as float32 host arrays."""
        ...

    def close(self) -> None: ...
