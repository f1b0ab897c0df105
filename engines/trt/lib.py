"""The thin boundary to the `tensorrt` library and the CUDA device (imports happen in calls).

Everything here is small on purpose: `import_tensorrt` turns a missing library into a
`TensorRTUnavailable` with a one-line install hint, `cuda_device` does the same for a
missing GPU, and `shared_logger` routes TensorRT's log into `logging` while
`capture_errors` keeps a call's errors for its exception message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from engines.trt.errors import INSTALL_HINT, TensorRTUnavailable
from engines.trt.profiles import enum_name

log = logging.getLogger("engines.trt")

NO_CUDA_HINT = (
    "no CUDA device is visible (torch.cuda.is_available() is False): TensorRT needs an "
    "NVIDIA GPU with a CUDA 12/13 driver"
)

# TensorRT ILogger.Severity member name -> logging level; None: dropped.
SEVERITY_LEVELS: dict[str, int | None] = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": None,  # hundreds of lines per build; progress() reports the stages instead
    "VERBOSE": None,
}


def import_tensorrt() -> Any:
    """The `tensorrt` module, or `TensorRTUnavailable` with the install hint."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, its .so files are not
        raise TensorRTUnavailable(INSTALL_HINT) from exc
    return tensorrt


@dataclass(frozen=True, slots=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]


def cuda_device(index: int = 0) -> CudaDevice:
    """The CUDA device TensorRT will run on, or `TensorRTUnavailable`."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(NO_CUDA_HINT)
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise TensorRTUnavailable(f"CUDA device {index} does not exist ({count} visible)")
    major, minor = torch.cuda.get_device_capability(index)
    return CudaDevice(index, torch.cuda.get_device_name(index), (int(major), int(minor)))


@dataclass(slots=True)
class LogSink:
    """Collects TensorRT's error lines for one build or load (for exception messages)."""

    errors: list[str] = field(default_factory=list)
    max_errors: int = 20

    def emit(self, severity: str, message: str) -> None:
        level = SEVERITY_LEVELS.get(severity, logging.WARNING)
        if level is not None and level >= logging.ERROR and len(self.errors) < self.max_errors:
            self.errors.append(message.strip())

    def summary(self, limit: int = 3) -> str:
        return " | ".join(self.errors[-limit:]) if self.errors else "no error was logged"


_current_sink: ContextVar[LogSink | None] = ContextVar("tensorrt_log_sink", default=None)
_loggers: dict[int, Any] = {}
_loggers_lock = threading.Lock()


def forward_log(severity: str, message: str) -> None:
    """Route one TensorRT log line: to `logging`, and to the sink of the current capture."""
    level = SEVERITY_LEVELS.get(severity, logging.WARNING)
    if level is None:
        return
    sink = _current_sink.get()
    if sink is not None:
        sink.emit(severity, message)
    log.log(level, "tensorrt: %s", message.strip())


@contextlib.contextmanager
def capture_errors() -> Iterator[LogSink]:
    """Collect the TensorRT errors logged on this thread inside the block."""
    sink = LogSink()
    token = _current_sink.set(sink)
    try:
        yield sink
    finally:
        _current_sink.reset(token)


def shared_logger(trt: Any) -> Any:
    """The one `trt.ILogger` of the process, created on first use and never freed.

    TensorRT keeps the first logger it is given as its global logger (later ones only get
    a warning), so a per-call Python logger could be collected while TensorRT still
    points at it. Per-call error capture goes through `capture_errors` instead.
    """
    with _loggers_lock:
        logger = _loggers.get(id(trt))
        if logger is None:

            class _Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    forward_log(enum_name(severity), msg)

            logger = _loggers[id(trt)] = _Logger()
        return logger


def progress_or_log(progress: Callable[[str], None] | None) -> Callable[[str], None]:
    return progress if progress is not None else (lambda msg: log.info("%s", msg))
