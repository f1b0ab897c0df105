"""Typed errors of the TensorRT backend, rooted in `engines.errors.EngineError`."""

from __future__ import annotations

from engines.errors import BackendUnavailable, BuildError, EngineError, EngineLoadError

INSTALL_HINT = (
    "tensorrt is not installed: pip install 'inflow[gpu]' on a host with an NVIDIA GPU "
    "and CUDA 12/13"
)


class TensorRTUnavailable(BackendUnavailable, RuntimeError):
    """`tensorrt` cannot be imported, or no CUDA device is visible."""


class TensorRTBuildError(BuildError):
    """Parsing the ONNX graph or building the TensorRT plan failed."""


class TensorRTLoadError(EngineLoadError):
    """A plan file cannot be used here (other TensorRT version or GPU, broken file, bad I/O)."""


class ShapeError(EngineError, ValueError):
    """A request's arrays do not fit the engine (rank, dtype, batch or sequence length)."""


class TensorRTRuntimeError(EngineError):
    """TensorRT refused to run an enqueued batch."""
