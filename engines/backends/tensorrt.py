"""The TensorRT backend: a serialized FP16 plan run with the TensorRT 10 tensor-name API.

`TensorRTBackend.load(plan)` is the only part that needs `tensorrt` and a GPU (imported
lazily, so this module imports anywhere). The backend itself talks to two narrow things:

- the engine and its execution context, typed as `TrtEngine` / `TrtContext` below (the
  handful of TensorRT 10 methods used: I/O tensor names, modes, dtypes, shapes,
  optimization profiles, `set_input_shape`, `set_tensor_address`, `execute_async_v3`);
- a `DeviceBuffers`: one device buffer per I/O tensor at its largest shape, a stream, and
  host<->device copies. `TorchCudaBuffers` is the real one (torch CUDA tensors, pinned
  host staging, a dedicated stream); unit tests pass a host-memory one with a fake engine.

Every decision (I/O contract, profile choice, shape checks, dtypes, output shapes) is a
pure function in `engines.trt`; `run` only sequences the calls.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy.typing as npt

from engines.backends.base import Float32Array, Int64Array
from engines.trt.bindings import IOLayout, TensorSpec, check_io, to_float32, to_input_dtype
from engines.trt.errors import ShapeError, TensorRTLoadError, TensorRTRuntimeError
from engines.trt.profiles import (
    INPUT_NAMES,
    Profile,
    Shape,
    check_request,
    dtype_name,
    enum_name,
    max_shape,
    profiles_from_engine,
    select_profile,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceBuffers", "TensorRTBackend", "TorchCudaBuffers", "TrtContext", "TrtEngine"]


class TrtContext(Protocol):
    """The `IExecutionContext` methods the backend calls."""

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool: ...

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool: ...

    def set_tensor_address(self, name: str, memory: int) -> bool: ...

    def execute_async_v3(self, stream_handle: int) -> bool: ...


class TrtEngine(Protocol):
    """The `ICudaEngine` members the backend reads."""

    @property
    def num_io_tensors(self) -> int: ...

    @property
    def num_optimization_profiles(self) -> int: ...

    def get_tensor_name(self, index: int) -> str: ...

    def get_tensor_mode(self, name: str) -> Any: ...

    def get_tensor_dtype(self, name: str) -> Any: ...

    def get_tensor_shape(self, name: str) -> Any: ...

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> Any: ...

    def create_execution_context(self) -> Any: ...


class DeviceBuffers(Protocol):
    """Device memory and a stream for one execution context.

    `allocate` is called once per I/O tensor at its largest shape and returns the device
    address TensorRT reads/writes. `upload` and `download` enqueue copies of the leading
    elements on the stream; `download` returns a host view that holds the data only after
    `synchronize()`, and only until the next run.
    """

    @property
    def stream_handle(self) -> int: ...

    def activate(self) -> contextlib.AbstractContextManager[None]: ...

    def allocate(self, name: str, shape: Shape, dtype: str) -> int: ...

    def upload(self, name: str, array: npt.NDArray[Any]) -> None: ...

    def download(self, name: str, shape: Shape) -> npt.NDArray[Any]: ...

    def synchronize(self) -> None: ...

    def release(self) -> None: ...


class TorchCudaBuffers:
    """`DeviceBuffers` on torch: CUDA tensors, pinned host staging, one dedicated stream
    (TensorRT warns, and syncs more, on the default stream)."""

    def __init__(self, device_index: int = 0) -> None:
        import torch

        self._torch = torch
        self._device = torch.device("cuda", device_index)
        self._stream = torch.cuda.Stream(device=self._device)
        self._dev: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] = {}

    @property
    def stream_handle(self) -> int:
        return int(self._stream.cuda_stream)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        with self._torch.cuda.device(self._device):
            yield

    def allocate(self, name: str, shape: Shape, dtype: str) -> int:
        numel = max(1, math.prod(shape))
        tdtype = torch_dtype(dtype)
        self._dev[name] = self._torch.empty(numel, dtype=tdtype, device=self._device)
        self._host[name] = self._torch.empty(numel, dtype=tdtype, pin_memory=True)
        return int(self._dev[name].data_ptr())

    def upload(self, name: str, array: npt.NDArray[Any]) -> None:
        n = array.size
        staging = self._host[name][:n]
        staging.numpy()[...] = array.reshape(-1)
        with self._torch.cuda.stream(self._stream):
            self._dev[name][:n].copy_(staging, non_blocking=True)

    def download(self, name: str, shape: Shape) -> npt.NDArray[Any]:
        n = math.prod(shape)
        staging = self._host[name][:n]
        with self._torch.cuda.stream(self._stream):
            staging.copy_(self._dev[name][:n], non_blocking=True)
        return staging.numpy().reshape(shape)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def release(self) -> None:
        self._dev.clear()
        self._host.clear()


def read_io(engine: TrtEngine) -> list[TensorSpec]:
    """The engine's I/O tensors, in its own order, as plain data."""
    specs = []
    for i in range(engine.num_io_tensors):
        name = str(engine.get_tensor_name(i))
        specs.append(
            TensorSpec(
                name=name,
                is_input=enum_name(engine.get_tensor_mode(name)) == "INPUT",
                dtype=dtype_name(engine.get_tensor_dtype(name)),
                shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
            )
        )
    return specs


def read_profiles(engine: TrtEngine) -> tuple[Profile, ...]:
    """The engine's optimization profiles (`get_tensor_profile_shape` of both inputs)."""
    per_profile = [
        {
            name: tuple(
                tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, k)
            )
            for name in INPUT_NAMES
        }
        for k in range(engine.num_optimization_profiles)
    ]
    return profiles_from_engine(per_profile)


class TensorRTBackend:
    """`Backend` over one TensorRT engine and one execution context.

    Build with `TensorRTBackend.load(plan_path)`; the constructor takes an already
    deserialized engine and the buffers to run it with. `run` is serialised by a lock;
    call it from one thread.
    """

    name = "tensorrt"

    def __init__(
        self,
        engine: TrtEngine,
        *,
        buffers: DeviceBuffers,
        precision: str = "fp16",
        keepalive: Sequence[object] = (),
    ) -> None:
        self.precision = precision
        self._layout: IOLayout = check_io(read_io(engine))
        self._profiles = read_profiles(engine)
        self._max_batch, self._max_seq = max_shape(self._profiles)
        self._buffers = buffers
        self._lock = threading.Lock()
        with buffers.activate():
            self._context: TrtContext | None = engine.create_execution_context()
            if self._context is None:
                raise TensorRTLoadError("TensorRT could not create an execution context")
            shapes = self._layout.buffer_shapes(self._max_batch, self._max_seq)
            self._addresses = {
                spec.name: buffers.allocate(spec.name, shapes[spec.name], spec.dtype)
                for spec in self._layout.tensors
            }
        self._active_profile = 0  # a new context starts on profile 0
        self._engine: TrtEngine | None = engine
        self._keepalive: tuple[object, ...] = tuple(keepalive)  # e.g. the trt.Runtime

    @classmethod
    def load(
        cls, plan_path: Path, *, device_index: int = 0, check_sidecar: bool = True
    ) -> TensorRTBackend:
        """Deserialize a plan built by `engines.build.trt.builder.build_engine` onto a GPU.

        Checks the plan's sidecar (TensorRT release, compute capability) first when there
        is one. Raises `TensorRTUnavailable` without tensorrt/CUDA, `TensorRTLoadError` for a
        plan this host cannot run.
        """
        from engines.trt.lib import capture_errors, cuda_device, import_tensorrt, shared_logger
        from engines.trt.meta import check_compatible, read_sidecar

        plan_path = Path(plan_path)
        if not plan_path.is_file():
            raise TensorRTLoadError(f"TensorRT plan not found: {plan_path}")
        trt = import_tensorrt()
        device = cuda_device(device_index)
        info = read_sidecar(plan_path)
        if info is not None and check_sidecar:
            check_compatible(
                info,
                tensorrt_version=str(trt.__version__),
                compute_capability=device.compute_capability,
            )
        buffers = TorchCudaBuffers(device.index)
        try:
            with buffers.activate(), capture_errors() as sink:
                logger = shared_logger(trt)
                runtime = trt.Runtime(logger)
                engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if engine is None:
                raise TensorRTLoadError(
                    f"TensorRT cannot deserialize {plan_path.name}: {sink.summary()}"
                )
            precision = info.precision if info is not None else "fp16"
            return cls(engine, buffers=buffers, precision=precision, keepalive=(runtime, logger))
        except BaseException:
            buffers.release()
            raise

    @property
    def max_batch_size(self) -> int:
        return self._max_batch

    @property
    def max_seq_len(self) -> int:
        return self._max_seq

    @property
    def num_labels(self) -> int:
        return self._layout.num_labels

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return self._profiles

    def run(
        self, input_ids: Int64Array, attention_mask: Int64Array
    ) -> tuple[Float32Array, Float32Array]:
        batch, seq = check_request(
            input_ids.shape, attention_mask.shape, max_batch=self._max_batch, max_seq=self._max_seq
        )
        profile = select_profile(self._profiles, batch, seq)
        host = {
            spec.name: to_input_dtype(array, spec.dtype)
            for spec, array in zip(self._layout.inputs, (input_ids, attention_mask), strict=True)
        }
        with self._lock:
            context = self._context
            if context is None:
                raise TensorRTRuntimeError("the TensorRT backend is closed")
            buffers = self._buffers
            stream = buffers.stream_handle
            with buffers.activate():
                try:
                    views = self._enqueue(context, stream, profile, host, batch, seq)
                finally:
                    buffers.synchronize()
            out = to_float32(views)
        return out["probs"], out["embedding"]

    def _enqueue(
        self,
        context: TrtContext,
        stream: int,
        profile: int,
        host: dict[str, npt.NDArray[Any]],
        batch: int,
        seq: int,
    ) -> dict[str, npt.NDArray[Any]]:
        if profile != self._active_profile:
            if not context.set_optimization_profile_async(profile, stream):
                raise TensorRTRuntimeError(f"TensorRT refused optimization profile {profile}")
            self._active_profile = profile
        for name, array in host.items():
            self._buffers.upload(name, array)
            if not context.set_input_shape(name, (batch, seq)):
                raise ShapeError(f"TensorRT refused input shape {name}=[{batch}, {seq}]")
        for spec in self._layout.tensors:
            if not context.set_tensor_address(spec.name, self._addresses[spec.name]):
                raise TensorRTRuntimeError(f"TensorRT refused the address of {spec.name}")
        if not context.execute_async_v3(stream):
            raise TensorRTRuntimeError(
                f"execute_async_v3 failed for batch={batch}, seq={seq} (see the TensorRT log)"
            )
        return {
            name: self._buffers.download(name, shape)
            for name, shape in self._layout.output_shapes(batch).items()
        }

    def close(self) -> None:
        """Free the context, engine and buffers. Safe to call twice."""
        with self._lock:
            if self._context is None:
                return
            self._context = None
            self._engine = None
            self._buffers.release()
            self._keepalive = ()
