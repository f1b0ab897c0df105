"""Throughput and latency of engines on the same real texts, in one run.

For each batch size, every engine predicts the same sequence of batches (engines are
interleaved per batch size so machine noise hits all of them alike). Latency is one
`predict` call end to end (tokenize + pad + run + label mapping).

A spec may carry ONNX Runtime session settings after an `@`, so that variants of one engine
are measured side by side in one run, e.g. `onnxruntime:int8@threads=1` or
`v1-onnxruntime-int8-...@spinning=1,optimization=basic`: each `key=value` is the
INFLOW_ORT_<KEY> variable the backend reads (threads, spinning, optimization, execution,
inter_threads), set while that engine is opened. `busy=N` runs N busy-looping processes
beside that variant while it is measured: a stand-in for the broker, the search server and
the worker's event loop that share the cores in production.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engines.errors import BuildError
from engines.runtime import run_batches
from engines.types import Engine

DEFAULT_BATCH_SIZES = (1, 8, 32, 64)
DEFAULT_SPECS = ("torch:fp32", "onnxruntime:fp32", "onnxruntime:int8")
MIN_BATCHES = 8
ROUNDS = 3
SESSION_KEYS = ("threads", "spinning", "optimization", "execution", "inter_threads")


@dataclass(frozen=True, slots=True)
class BenchRow:
    engine: str  # "onnxruntime:int8" or a registry version
    batch_size: int
    texts: int
    texts_per_s: float
    p50_ms: float
    p95_ms: float


def batches_for(
    texts: Sequence[str], batch_size: int, min_batches: int = MIN_BATCHES
) -> list[list[str]]:
    """Consecutive batches covering `texts` (cycled to at least `min_batches` batches)."""
    count = max(-(-len(texts) // batch_size), min_batches)
    out: list[list[str]] = []
    pos = 0
    for _ in range(count):
        batch = [texts[(pos + j) % len(texts)] for j in range(batch_size)]
        pos += batch_size
        out.append(batch)
    return out


def _row(name: str, batch_size: int, texts: int, wall_s: float, times: Sequence[float]) -> BenchRow:
    ms = np.array(times) * 1000.0
    return BenchRow(
        engine=name,
        batch_size=batch_size,
        texts=texts,
        texts_per_s=texts / wall_s if wall_s > 0 else 0.0,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
    )


def measure(engine: Engine, batches: Sequence[list[str]], name: str) -> BenchRow:
    """One engine alone over `batches` (after one warm-up call), as many batches at once as
    the engine runs in the worker (`run_batches`)."""
    engine.predict(batches[0])  # warm this shape
    wall_s, times = run_batches(engine, batches)
    return _row(name, len(batches[0]), sum(len(b) for b in batches), wall_s, times)


def measure_rounds(
    engines: dict[str, Engine],
    batches: Sequence[list[str]],
    rounds: int = ROUNDS,
    busy: Mapping[str, int] | None = None,
) -> list[BenchRow]:
    """Each engine runs the whole batch list in turn, `rounds` times (A B C A B C ...); the
    round with the median throughput is kept, so a burst of noise on this shared machine
    does not decide the comparison. (Not per batch: onnxruntime's spinning threads would
    steal the CPU from whichever engine runs right after it.) `busy[name]` busy-looping
    processes run beside that engine while it is measured."""
    runs: dict[str, list[BenchRow]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            with busy_load((busy or {}).get(name, 0)):
                runs[name].append(measure(engine, batches, name))
    return [sorted(r, key=lambda row: row.texts_per_s)[len(r) // 2] for r in runs.values()]


def _spin(stop: Any) -> None:
    while not stop.is_set():
        for _ in range(10_000):
            pass


@contextlib.contextmanager
def busy_load(processes: int) -> Iterator[None]:
    """`processes` CPU-bound processes for the duration of the block."""
    if processes <= 0:
        yield
        return
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(processes)]
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def split_spec(spec: str) -> tuple[str, dict[str, str], int]:
    """'base@key=value,...' -> (base, {INFLOW_ORT_KEY: value}, busy processes)."""
    base, _, options = spec.partition("@")
    env: dict[str, str] = {}
    busy = 0
    for option in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = option.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise BuildError(f"{spec!r}: option {option!r} is not key=value")
        if key == "busy":
            if not value.strip().isdigit():
                raise BuildError(f"{spec!r}: busy takes a process count, not {value!r}")
            busy = int(value)
        elif key in SESSION_KEYS:
            env[f"INFLOW_ORT_{key.upper()}"] = value.strip()
        else:
            raise BuildError(f"{spec!r}: unknown option {key!r} (busy, {', '.join(SESSION_KEYS)})")
    return base, env, busy


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the block, restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def bench_engines(
    engines: dict[str, Engine],
    texts: Sequence[str],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    progress: bool = True,
    busy: Mapping[str, int] | None = None,
) -> list[BenchRow]:
    if not texts:
        raise ValueError("bench needs texts")
    rows: list[BenchRow] = []
    for bs in tqdm(batch_sizes, desc="bench", unit="batch size", disable=not progress):
        able = {name: e for name, e in engines.items() if bs <= e.max_batch_size}
        if able:
            rows.extend(measure_rounds(able, batches_for(texts, bs), busy=busy))
    return rows


def speedups(rows: Sequence[BenchRow], baseline: str = "torch:fp32") -> list[str]:
    """'<engine> / <baseline> at batch N: x.xx' for every engine and batch size measured."""
    base = {r.batch_size: r.texts_per_s for r in rows if r.engine == baseline}
    return [
        f"{r.engine} / {baseline} at batch {r.batch_size}: "
        f"{r.texts_per_s / base[r.batch_size]:.2f}x"
        for r in rows
        if r.engine != baseline and base.get(r.batch_size)
    ]


def format_table(rows: Sequence[BenchRow]) -> str:
    """One table: a row per engine, for each batch size texts/s and p50/p95 ms."""
    if not rows:
        return "(no results)"
    names = list(dict.fromkeys(r.engine for r in rows))
    sizes = sorted({r.batch_size for r in rows})
    cell = {(r.engine, r.batch_size): r for r in rows}
    width = max(len("engine"), *(len(n) for n in names))
    head = f"{'engine':<{width}}" + "".join(f" | {'batch ' + str(b):>22}" for b in sizes)
    sub = " " * width + "".join(f" | {'texts/s  p50/p95 ms':>22}" for _ in sizes)
    lines = [head, sub, "-" * len(head)]
    for name in names:
        parts = []
        for b in sizes:
            r = cell.get((name, b))
            parts.append(
                f" | {r.texts_per_s:7.1f} {r.p50_ms:6.1f}/{r.p95_ms:6.1f}" if r else f" | {'-':>22}"
            )
        lines.append(f"{name:<{width}}" + "".join(parts))
    return "\n".join(lines)


def open_spec(spec: str, model: Any, max_batch: int, max_seq: int, threads: int | None) -> Engine:
    """An engine for 'backend:precision' built straight from a model folder (no registry)."""
    from engines.builder.pipeline import manifest_for
    from engines.load import open_engine
    from engines.modeldir import TOKENIZER_FILE
    from engines.registry import ACCEPTED

    backend, _, precision = spec.partition(":")
    precision = precision or "fp32"
    info = model
    if backend == "onnxruntime":
        from engines.builder.export import export_model

        onnx_path = export_model(info, precision, fused=True)
        folder, artifact = onnx_path.parent, onnx_path.name
        tokenizer = str(Path("..") / TOKENIZER_FILE)
    elif backend == "torch":
        folder, artifact, tokenizer = info.path, "model.json", TOKENIZER_FILE
    else:
        raise BuildError(f"bench builds only onnxruntime and torch engines directly, not {spec!r}")
    manifest = manifest_for(
        info,
        version=spec,
        backend=backend,
        precision=precision,
        max_batch=max_batch,
        max_seq=max_seq,
        artifact=artifact,
        tokenizer=tokenizer,
        status=ACCEPTED,
    )
    return open_engine(folder, manifest, warmup=True, threads=threads)


def run_bench(
    specs: Sequence[str] = DEFAULT_SPECS,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    n: int = 512,
    model: Path | str | None = None,
    registry_root: Path | str | None = None,
    max_seq: int = 256,
    threads: int | None = None,
    json_path: Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> list[BenchRow]:
    """Benchmark engines named 'backend:precision' (from the model folder) or registry versions."""
    from engines.builder.data import sample_texts
    from engines.builder.pipeline import resolve_model
    from engines.load import load_engine

    say = echo or (lambda _m: None)
    max_batch = max(batch_sizes)
    info = None
    engines: dict[str, Engine] = {}
    busy: dict[str, int] = {}
    try:
        for spec in specs:
            base, env, busy[spec] = split_spec(spec)
            with environment(env):
                if ":" in base:
                    if info is None:
                        info = resolve_model(model, progress=progress, echo=say)
                    engines[spec] = open_spec(base, info, max_batch, max_seq, threads)
                else:
                    if registry_root is None:
                        raise BuildError(f"{base!r} looks like a registry version: pass --registry")
                    engines[spec] = load_engine(registry_root, base, threads=threads)
        texts = sample_texts(n, seed=7)
        say(f"bench: {len(engines)} engines, batch sizes {list(batch_sizes)}, {n} real texts")
        rows = bench_engines(engines, texts, batch_sizes, progress, busy)
    finally:
        for engine in engines.values():
            engine.close()
    say(format_table(rows))
    ratios = speedups(rows)
    for line in ratios:
        say(line)
    if json_path is not None:
        payload = {
            "rows": [asdict(r) for r in rows],
            "speedups_vs_torch_fp32": ratios,
            "texts": n,
            "threads": threads,
            "model": None if info is None else {"name": info.name, "hash": info.hash},
        }
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
        say(f"results written to {json_path}")
    return rows
