"""The TensorRT backend: a serialized plan (built by `engines.builder.tensorrt`) run with the
TensorRT 10/11 tensor-name API, device memory and the CUDA stream taken from torch.

Only `TensorRTBackend.load` needs `tensorrt`, torch and a GPU, and imports them in the call,
so this module imports anywhere. The decisions around it are pure and tested without them:
`read_contract` (the plan's I/O against the serving graph of `engines/backends/base.py`,
with the label count and the embedding width read from the plan, never assumed) and
`check_built_here` (a plan runs only on the TensorRT release and GPU architecture that built
it; the record written beside it says which, so a mismatch is one line, not a null engine).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Float32Array, Int64Array, check_batch_shape
from engines.errors import BackendUnavailable, EngineError, EngineLoadError

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("probs", "embedding")  # probs is absent from an embedder's plan
INSTALL_HINT = (
    "tensorrt is not installed: pip install 'inflow[gpu]' on a host with an NVIDIA GPU "
    "and CUDA 12/13"
)
INPUT_DTYPES = {"INT32": np.int32, "INT64": np.int64}  # TensorRT DataType names
OUTPUT_DTYPES = frozenset({"FLOAT", "HALF"})


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One I/O tensor as the plan declares it (-1 marks a dynamic axis)."""

    name: str
    is_input: bool
    dtype: str  # TensorRT DataType member name: "INT64", "FLOAT", "HALF", ...
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Contract:
    input_dtype: str  # "INT32" | "INT64", the same for both inputs
    num_labels: int  # 0 for an embedder
    width: int  # the embedding width


def read_contract(specs: Sequence[TensorSpec]) -> Contract:
    """The plan's contract, or one `EngineLoadError` naming every difference."""
    by_name = {s.name: s for s in specs}
    problems: list[str] = []
    inputs = sorted(s.name for s in specs if s.is_input)
    outputs = sorted(s.name for s in specs if not s.is_input)
    if inputs != sorted(INPUT_NAMES):
        problems.append(f"inputs are {inputs}, expected {sorted(INPUT_NAMES)}")
    if outputs not in (sorted(OUTPUT_NAMES), ["embedding"]):
        problems.append(f"outputs are {outputs}, expected {sorted(OUTPUT_NAMES)} or ['embedding']")
    if problems:
        raise EngineLoadError(
            "TensorRT plan does not match the serving graph: " + "; ".join(problems)
        )
    dtypes = {by_name[n].dtype for n in INPUT_NAMES}
    if len(dtypes) != 1 or not dtypes <= set(INPUT_DTYPES):
        problems.append(f"inputs are {sorted(dtypes)}, expected both INT32 or both INT64")
    for name in INPUT_NAMES:
        if len(by_name[name].shape) != 2:
            problems.append(f"{name} has shape {by_name[name].shape}, expected [batch, seq]")
    widths: dict[str, int] = {}
    for name in outputs:
        spec = by_name[name]
        if spec.dtype not in OUTPUT_DTYPES:
            problems.append(f"{name} is {spec.dtype}, expected FLOAT or HALF")
        if len(spec.shape) != 2 or spec.shape[1] < 1:
            problems.append(f"{name} has shape {spec.shape}, expected [batch, n] with a fixed n")
        else:
            widths[name] = spec.shape[1]
    if problems:
        raise EngineLoadError(
            "TensorRT plan does not match the serving graph: " + "; ".join(problems)
        )
    return Contract(dtypes.pop(), widths.get("probs", 0), widths["embedding"])


def record_path(plan: Path) -> Path:
    """`model.plan` -> `model.plan.json`: where the build record lies."""
    return plan.with_name(plan.name + ".json")


def check_built_here(record: dict[str, Any], tensorrt_version: str, capability: str) -> None:
    """Raise `EngineLoadError` unless this TensorRT release (major.minor.patch) and GPU
    architecture (compute capability "8.0", ...) are the ones the plan was built with."""
    problems = []
    built = str(record.get("tensorrt_version", "?"))
    if built.split(".")[:3] != tensorrt_version.split(".")[:3]:
        problems.append(f"built with TensorRT {built}, this host has {tensorrt_version}")
    if str(record.get("compute_capability", "?")) != capability:
        problems.append(
            f"built for compute capability {record.get('compute_capability')} "
            f"({record.get('gpu', '?')}), this GPU is {capability}"
        )
    if problems:
        raise EngineLoadError("; ".join(problems) + ": rebuild the TensorRT engine on this host")


def _name(enum_value: object) -> str:
    """A TensorRT enum member's name ("DataType.HALF" -> "HALF")."""
    return str(getattr(enum_value, "name", enum_value)).rsplit(".", 1)[-1]


def import_tensorrt() -> Any:
    """`tensorrt` and a visible CUDA device, or `BackendUnavailable` in one line."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, its libraries are not
        raise BackendUnavailable(INSTALL_HINT) from exc
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device is visible: TensorRT needs an NVIDIA GPU")
    return tensorrt


class TensorRTBackend:
    """`Backend` over one TensorRT plan and one execution context; `run` holds a lock."""

    name = "tensorrt"
    concurrent_runs = 1  # one execution context and one set of device buffers

    def __init__(self, engine: Any, precision: str, keepalive: tuple[object, ...]) -> None:
        import torch

        self.precision = precision
        self._torch = torch
        specs = [
            TensorSpec(
                name := str(engine.get_tensor_name(i)),
                _name(engine.get_tensor_mode(name)) == "INPUT",
                _name(engine.get_tensor_dtype(name)),
                tuple(int(d) for d in engine.get_tensor_shape(name)),
            )
            for i in range(engine.num_io_tensors)
        ]
        self._contract = read_contract(specs)
        _, _, (self._max_batch, self._max_seq) = engine.get_tensor_profile_shape(INPUT_NAMES[0], 0)
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self._device)
        self._outputs = {
            s.name: torch.empty(
                (self._max_batch, s.shape[1]),
                dtype=torch.float16 if s.dtype == "HALF" else torch.float32,
                device=self._device,
            )
            for s in specs
            if not s.is_input
        }
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineLoadError("TensorRT could not create an execution context")
        self._lock = threading.Lock()
        self._keepalive = (engine, *keepalive)  # the runtime must outlive the engine

    @classmethod
    def load(cls, plan: Path) -> TensorRTBackend:
        """Deserialize a plan onto the current GPU, after checking its build record."""
        plan = Path(plan)
        if not plan.is_file():
            raise EngineLoadError(f"TensorRT plan not found: {plan}")
        trt = import_tensorrt()
        import torch

        record = json.loads(record_path(plan).read_text()) if record_path(plan).is_file() else {}
        if record:
            major, minor = torch.cuda.get_device_capability()
            check_built_here(record, str(trt.__version__), f"{major}.{minor}")
        logger = trt.Logger(trt.Logger.ERROR)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise EngineLoadError(f"TensorRT cannot deserialize {plan.name} (see its log above)")
        return cls(engine, str(record.get("precision", "fp16")), (runtime, logger))

    @property
    def max_batch_size(self) -> int:
        return int(self._max_batch)

    @property
    def max_seq_len(self) -> int:
        return int(self._max_seq)

    @property
    def embedding_dim(self) -> int:
        return self._contract.width

    def run(
        self, input_ids: Int64Array, attention_mask: Int64Array
    ) -> tuple[Float32Array, Float32Array]:
        check_batch_shape(input_ids, self.max_batch_size, self.max_seq_len)
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {input_ids.shape} and attention_mask differ in shape")
        n, seq = input_ids.shape
        torch, dtype = self._torch, INPUT_DTYPES[self._contract.input_dtype]
        with self._lock:
            context = self._context
            if context is None:
                raise EngineError("the TensorRT backend is closed")
            with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
                held = []  # the input tensors live until the stream has run
                for name, array in zip(INPUT_NAMES, (input_ids, attention_mask), strict=True):
                    host = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
                    held.append(host.to(self._device, non_blocking=False))
                    context.set_input_shape(name, (n, seq))
                    context.set_tensor_address(name, held[-1].data_ptr())
                for name, buffer in self._outputs.items():
                    context.set_tensor_address(name, buffer.data_ptr())
                if not context.execute_async_v3(self._stream.cuda_stream):
                    raise EngineError(f"TensorRT failed to run a batch of {n}x{seq}")
                out = {k: v[:n].float().cpu().numpy() for k, v in self._outputs.items()}
                self._stream.synchronize()
        probs = out.get("probs", np.zeros((n, 0), dtype=np.float32))
        return probs, out["embedding"]

    def close(self) -> None:
        """Free the context, the engine and the buffers. Safe to call twice."""
        with self._lock:
            self._context = None
            self._outputs = {}
            self._keepalive = ()
