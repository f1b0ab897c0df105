"""The engine alone and the Batcher's padding, in the bench's own process (no Kafka)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from engines.runtime import run_batches
from engines.types import BatchResult, Engine, ModelIdentity, TokenizedText
from streams.cli.bench.progress import progress
from streams.delivery.batcher import Batcher, BatchPolicy


@dataclass(frozen=True, slots=True)
class EngineOnly:
    texts_per_s: float
    cpu_s_per_text: float
    median_batch_ms: float
    batch_size: int


def measure_engine(
    engine: Engine, texts: list[str], batch_size: int, desc: str = "engine only"
) -> EngineOnly:
    """The engine alone on consecutive batches of `texts`, as many at once as the worker runs."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    engine.predict(batches[0])  # warm
    bar = progress(len(texts), desc)
    cpu0 = time.process_time()
    wall, seconds = run_batches(engine, batches, bar.update)
    cpu = time.process_time() - cpu0
    bar.close()
    times = [s * 1000 for s in seconds]
    return EngineOnly(len(texts) / wall, cpu / len(texts), statistics.median(times), batch_size)


class _TokenizeOnly:
    """The engine's tokenizer with an instant predict: batch selection without the model."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def identity(self) -> ModelIdentity:
        return self._engine.identity

    @property
    def concurrent_batches(self) -> int:
        return 1

    @property
    def max_batch_size(self) -> int:
        return self._engine.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self._engine.max_seq_len

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self._engine.count_tokens(texts)

    def tokenize(self, texts: list[str]) -> list[TokenizedText]:
        return self._engine.tokenize(texts)

    def predict(
        self, texts: list[str], tokens: Sequence[TokenizedText] | None = None
    ) -> BatchResult:
        import numpy as np

        n = len(texts)
        return BatchResult(
            ["x"] * n,
            [{"x": 1.0}] * n,
            np.zeros((n, 384), dtype=np.float32),
            [False] * n,
            self._engine.identity,
        )

    def close(self) -> None:
        pass


def padding_ratio(engine: Engine, texts: list[str], policy: BatchPolicy, in_flight: int) -> float:
    """Padded tokens per real token when a backlog flows through the Batcher, `in_flight`
    texts queued at a time (as the infer stage keeps them)."""

    async def run() -> float:
        batcher = Batcher(_TokenizeOnly(engine), policy)
        await batcher.start()
        slots = asyncio.Semaphore(in_flight)

        async def one(text: str) -> None:
            async with slots:
                await batcher.submit(text)

        await asyncio.gather(*(one(t) for t in texts))
        await batcher.stop()
        return batcher.stats.padding_ratio

    return asyncio.run(run())
