"""ONNX Runtime backend: CPU EP by default, CUDA EP when onnxruntime-gpu offers it.

Imports onnxruntime and numpy only (never torch), so a serving process that loads an
onnxruntime engine stays small.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Float32Array, Int64Array, check_batch_shape
from engines.errors import BackendUnavailable, EngineLoadError

ENV_PROVIDERS = "INFLOW_ORT_PROVIDERS"  # e.g. "CUDAExecutionProvider,CPUExecutionProvider"
ENV_THREADS = "INFLOW_ORT_THREADS"  # intra-op threads per run (default: cores / concurrent runs)
ENV_CONCURRENT_RUNS = "INFLOW_ORT_CONCURRENT_RUNS"  # batches run at once (default: one per core)
ENV_SPINNING = "INFLOW_ORT_SPINNING"  # "1": idle intra-op threads spin (default "0": they sleep)
ENV_OPTIMIZATION = "INFLOW_ORT_OPTIMIZATION"  # graph optimisation: all (default), extended, basic
ENV_EXECUTION = "INFLOW_ORT_EXECUTION"  # sequential (default) or parallel
ENV_INTER_THREADS = "INFLOW_ORT_INTER_THREADS"  # threads between nodes in parallel mode (1)

OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disabled")
# Session graph fusions that slow the CPU down: SkipLayerNormFusion would fuse each residual
# Add + LayerNormalization into onnxruntime's SkipLayerNormalization, whose CPU kernel took
# 5-6x as long at every shape measured (engines.builder.export.fuse_for_onnxruntime).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
EXECUTION_MODES = ("sequential", "parallel")


def available_cores() -> int:
    """Cores this process may use (affinity-aware), capped at 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _positive(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """ONNX Runtime session options, measured with `inflow engine bench` (docs/benchmarks.md).

    Spinning is off by default: on a 2-vCPU machine shared with Kafka, the search server and
    the worker's own event loop, spinning intra-op threads took the CPU those need. With it, a
    worker drained a backlog at 150-163 events/s and 5.7-6.1 ms of CPU per event; without it,
    at 267-269 events/s and 3.4 ms (same machine, interleaved runs). Engine alone on idle
    cores, spinning is faster at batch 1; `INFLOW_ORT_SPINNING=1` turns it back on.

    By default batches run side by side, one per core, each on one intra-op thread
    (`concurrent_runs`, one session: onnxruntime's `run` is thread-safe). One batch spread over
    both cores waits for the slower of its two threads at every operator, and on a machine
    shared with Kafka and the search server one of them is often descheduled
    (docs/benchmarks.md: the produce -> prediction p99 at half of capacity). An explicit thread
    count (`INFLOW_ORT_THREADS`, `--threads`) keeps one batch at a time unless
    `INFLOW_ORT_CONCURRENT_RUNS` says otherwise."""

    intra_op_threads: int
    concurrent_runs: int = 1
    inter_op_threads: int = 1
    spinning: bool = False
    optimization: str = "all"
    execution: str = "sequential"

    def __post_init__(self) -> None:
        if self.intra_op_threads < 1 or self.inter_op_threads < 1 or self.concurrent_runs < 1:
            raise ValueError(f"thread counts must be positive: {self}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"graph optimisation {self.optimization!r}: one of {', '.join(OPTIMIZATION_LEVELS)}"
            )
        if self.execution not in EXECUTION_MODES:
            raise ValueError(f"execution {self.execution!r}: one of {', '.join(EXECUTION_MODES)}")

    @classmethod
    def from_env(cls, intra_op_threads: int | None = None) -> SessionSettings:
        """Defaults, overridden by the INFLOW_ORT_* variables (and an explicit thread count)."""
        env = os.environ
        inter = env.get(ENV_INTER_THREADS, "1")
        cores = available_cores()
        threads = intra_op_threads or _positive(ENV_THREADS)
        runs = _positive(ENV_CONCURRENT_RUNS) or (1 if threads else cores)
        return cls(
            intra_op_threads=threads or max(1, cores // runs),
            concurrent_runs=runs,
            inter_op_threads=int(inter) if inter.isdigit() else 1,
            spinning=env.get(ENV_SPINNING, "0") == "1",
            optimization=env.get(ENV_OPTIMIZATION, "all").strip().lower() or "all",
            execution=env.get(ENV_EXECUTION, "sequential").strip().lower() or "sequential",
        )

    def options(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.optimization]
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if self.execution == "parallel"
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        opts.log_severity_level = 3
        opts.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.spinning else "0"
        )
        opts.add_session_config_entry(
            "session.inter_op.allow_spinning", "1" if self.spinning else "0"
        )
        return opts


def choose_providers(available: Sequence[str], requested: Sequence[str] | None = None) -> list[str]:
    """Execution providers in priority order.

    Explicit `requested` (or env INFLOW_ORT_PROVIDERS) wins, filtered to what is available.
    Otherwise CUDA when available, then CPU. The TensorRT EP is used only when asked for:
    it compiles an engine at session start (minutes) and does not run dynamic-INT8 graphs.
    """
    if requested is None:
        env = os.environ.get(ENV_PROVIDERS)
        requested = [p.strip() for p in env.split(",") if p.strip()] if env else None
    if requested:
        chosen = [p for p in requested if p in available]
        if not chosen:
            raise BackendUnavailable(
                f"none of the ONNX Runtime providers {', '.join(requested)} is available "
                f"(have: {', '.join(available)})"
            )
        if "CPUExecutionProvider" not in chosen and "CPUExecutionProvider" in available:
            chosen.append("CPUExecutionProvider")
        return chosen
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*chosen, "CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """Runs the serving graph (input_ids, attention_mask) -> (probs, embedding)."""

    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        precision: str,
        max_batch_size: int,
        max_seq_len: int,
        intra_op_threads: int | None = None,
        providers: Sequence[str] | None = None,
        settings: SessionSettings | None = None,
    ) -> None:
        """`settings`: the session options; by default `SessionSettings.from_env`."""
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise BackendUnavailable(
                "onnxruntime is not installed: pip install onnxruntime"
            ) from exc
        self.precision = precision
        self._max_batch = max_batch_size
        self._max_seq = max_seq_len
        self.settings = settings or SessionSettings.from_env(intra_op_threads)
        opts = self.settings.options()
        self.providers = choose_providers(ort.get_available_providers(), providers)
        cpu_only = self.providers == ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(
                str(model_path),
                sess_options=opts,
                providers=self.providers,
                disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS) if cpu_only else None,
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineLoadError(f"onnxruntime cannot open {model_path}: {first}") from exc
        names = [i.name for i in self._session.get_inputs()]
        if sorted(names) != ["attention_mask", "input_ids"]:
            raise EngineLoadError(
                f"{model_path} is not a serving graph (inputs {names}): rebuild the engine"
            )
        outputs = [o.name for o in self._session.get_outputs()]
        if "embedding" not in outputs or not set(outputs) <= {"probs", "embedding"}:
            raise EngineLoadError(
                f"{model_path} is not a serving graph (outputs {outputs}): rebuild the engine"
            )
        self._outputs = ["probs", "embedding"] if "probs" in outputs else ["embedding"]
        self.intra_op_threads = self.settings.intra_op_threads
        self.concurrent_runs = self.settings.concurrent_runs

    @property
    def max_batch_size(self) -> int:
        return self._max_batch

    @property
    def max_seq_len(self) -> int:
        return self._max_seq

    def run(
        self, input_ids: Int64Array, attention_mask: Int64Array
    ) -> tuple[Float32Array, Float32Array]:
        check_batch_shape(input_ids, self._max_batch, self._max_seq)
        out = self._session.run(
            self._outputs,
            {
                "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            },
        )
        embedding = np.asarray(out[-1], dtype=np.float32)
        if len(out) == 1:  # an embedder's graph
            return np.zeros((embedding.shape[0], 0), dtype=np.float32), embedding
        return np.asarray(out[0], dtype=np.float32), embedding

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
