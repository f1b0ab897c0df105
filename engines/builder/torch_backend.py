"""PyTorch backend: the fp32 reference every other engine is gated against.

`precision='fp16'` runs the module in float16 (CUDA when present, else CPU float16 math,
which is slow but shows overflow/NaN risk); 'bf16' is accepted for CPU emulation studies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.backends.base import Float32Array, Int64Array, check_batch_shape

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchBackend:
    name = "torch"
    concurrent_runs = 1  # the reference: torch parallelises inside each run

    def __init__(
        self,
        module: Any,
        precision: str = "fp32",
        max_batch_size: int = 64,
        max_seq_len: int = 256,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        if precision not in _DTYPES:
            raise ValueError(f"torch backend precision must be one of {', '.join(_DTYPES)}")
        if threads:
            torch.set_num_threads(threads)
        self.precision = precision
        self._max_batch = max_batch_size
        self._max_seq = max_seq_len
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, _DTYPES[precision])
        self._module = module.eval().to(device=self.device, dtype=self.dtype)
        self.labels: list[str] = list(getattr(module, "labels", []))

    @property
    def module(self) -> Any:
        return self._module

    @property
    def max_batch_size(self) -> int:
        return self._max_batch

    @property
    def max_seq_len(self) -> int:
        return self._max_seq

    def run(
        self, input_ids: Int64Array, attention_mask: Int64Array
    ) -> tuple[Float32Array, Float32Array]:
        import torch

        check_batch_shape(input_ids, self._max_batch, self._max_seq)
        with torch.inference_mode():
            ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device)
            mask = torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.device)
            probs, emb = self._module(ids, mask)
            return (
                probs.float().cpu().numpy().astype(np.float32, copy=False),
                emb.float().cpu().numpy().astype(np.float32, copy=False),
            )

    def close(self) -> None:
        self._module = None
