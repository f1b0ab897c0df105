"""The router: queues texts, forms micro-batches, runs the engine on its one thread.

A batch closes when it reaches `max_batch_size` texts, when adding the next text would push
its padded token cost (longest text x count) past `max_batch_tokens`, or when its oldest text
has waited `max_wait_ms`. The blocking engine runs on one dedicated thread; the event loop
only awaits results. Engine swaps (`swap_engine`) run on that same thread, so a new version
takes over strictly between two batches: no batch is split across versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from engines.types import BatchResult, Engine, ModelIdentity


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_batch_tokens: int = 4096
    max_wait_ms: int = 25


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One text's answer, with where its time went."""

    label: str
    scores: dict[str, float]
    embedding: npt.NDArray[np.float32]
    truncated: bool
    model: ModelIdentity
    queue_ms: float
    infer_ms: float
    batch_size: int


@dataclass(slots=True)
class _Item:
    text: str
    tokens: int
    future: asyncio.Future[ItemResult]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class BatcherStats:
    batches: int = 0
    texts: int = 0
    failed_batches: int = 0
    infer_seconds: float = 0.0
    batch_size_histogram: dict[int, int] = field(default_factory=dict)


class InferenceFailed(Exception):
    """The engine raised for this text even when run alone."""


class NoEngine(RuntimeError):
    """Asked to run before the first engine was loaded (the worker waits for one)."""


class Batcher:
    """Explicit lifecycle: `start()` spawns the batching task, `stop()` drains then stops."""

    def __init__(
        self,
        engine: Engine | None,
        policy: BatchPolicy,
        on_batch: Callable[[int, float], object] | None = None,
    ) -> None:
        """`engine` may be None: a worker started before any engine exists gets one later
        through `swap_engine`, and nothing is submitted until then."""
        if policy.max_batch_size < 1 or policy.max_batch_tokens < 1 or policy.max_wait_ms < 0:
            raise ValueError(f"invalid batch policy {policy}")
        self._requested = policy
        self._engine = engine
        self.policy = self._fit(policy, engine)
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inflow-engine")
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._engine_lock = threading.Lock()  # guards _engine between the loop and the thread
        self.stats = BatcherStats()
        self._on_batch = on_batch  # (batch size, engine ms), for metrics

    @staticmethod
    def _fit(policy: BatchPolicy, engine: Engine | None) -> BatchPolicy:
        """The router lowers its limits to what the backend supports."""
        if engine is None:
            return policy
        return BatchPolicy(
            min(policy.max_batch_size, engine.max_batch_size),
            policy.max_batch_tokens,
            policy.max_wait_ms,
        )

    @property
    def engine(self) -> Engine:
        with self._engine_lock:
            engine = self._engine
        if engine is None:
            raise NoEngine("no engine loaded yet")
        return engine

    @property
    def identity(self) -> ModelIdentity | None:
        with self._engine_lock:
            return None if self._engine is None else self._engine.identity

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="inflow-batcher")

    async def stop(self) -> None:
        """Answer everything already queued, then stop the thread. Safe to call twice."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._thread.shutdown(wait=True)

    async def submit(self, text: str) -> ItemResult:
        if self._stopping:
            raise RuntimeError("batcher is stopping")
        loop = asyncio.get_running_loop()
        tokens = self.engine.count_tokens([text])[0]
        item = _Item(text, tokens, loop.create_future())
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    async def embed_query(self, text: str) -> list[float]:
        """An embedding for search (runs on the engine thread, between batches)."""
        result = await self.submit(text)
        return [float(x) for x in result.embedding]

    async def swap_engine(self, load: Callable[[], Engine]) -> ModelIdentity:
        """Load a new engine on the engine thread and switch to it between two batches."""
        loop = asyncio.get_running_loop()

        def load_and_swap() -> tuple[Engine | None, Engine]:
            new = load()
            with self._engine_lock:
                old, self._engine = self._engine, new
                self.policy = self._fit(self._requested, new)
            return old, new

        old, new = await loop.run_in_executor(self._thread, load_and_swap)
        if old is not None and old is not new:
            old.close()
        return new.identity

    # ----------------------------------------------------------------- batching loop

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        longest = 0
        while self._pending and len(batch) < self.policy.max_batch_size:
            candidate = self._pending[0]
            padded = max(longest, candidate.tokens) * (len(batch) + 1)
            if batch and padded > self.policy.max_batch_tokens:
                break
            batch.append(self._pending.popleft())
            longest = max(longest, candidate.tokens)
        return batch

    def _ready(self) -> bool:
        if not self._pending:
            return False
        if self._stopping or len(self._pending) >= self.policy.max_batch_size:
            return True
        tokens = max(item.tokens for item in self._pending) * len(self._pending)
        if tokens >= self.policy.max_batch_tokens:
            return True
        waited_ms = (time.perf_counter() - self._pending[0].enqueued) * 1000
        return waited_ms >= self.policy.max_wait_ms

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._ready():
                waited = time.perf_counter() - self._pending[0].enqueued
                timeout = max(0.0, self.policy.max_wait_ms / 1000 - waited)
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                continue
            batch = [item for item in self._take_batch() if not item.future.cancelled()]
            if batch:
                await self._infer(loop, batch)

    async def _infer(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        texts = [item.text for item in batch]
        started = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._thread, self._predict, texts)
        except Exception:
            self.stats.failed_batches += 1
            # Isolate the text that breaks the engine: retry one at a time.
            for item in batch:
                await self._infer_one(loop, item)
            return
        self._deliver(batch, result, started)

    async def _infer_one(self, loop: asyncio.AbstractEventLoop, item: _Item) -> None:
        started = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._thread, self._predict, [item.text])
        except Exception as exc:
            if not item.future.done():
                message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
                item.future.set_exception(InferenceFailed(message))
            return
        self._deliver([item], result, started)

    def _predict(self, texts: list[str]) -> BatchResult:
        return self.engine.predict(texts)

    def _deliver(self, batch: list[_Item], result: BatchResult, started: float) -> None:
        finished = time.perf_counter()
        infer_ms = (finished - started) * 1000
        self.stats.batches += 1
        self.stats.texts += len(batch)
        self.stats.infer_seconds += finished - started
        histogram = self.stats.batch_size_histogram
        histogram[len(batch)] = histogram.get(len(batch), 0) + 1
        if self._on_batch is not None:
            self._on_batch(len(batch), infer_ms)
        for i, item in enumerate(batch):
            if item.future.done():  # the caller went away
                continue
            item.future.set_result(
                ItemResult(
                    label=result.labels[i],
                    scores=result.scores[i],
                    embedding=result.embeddings[i],
                    truncated=result.truncated[i],
                    model=result.model,
                    queue_ms=(started - item.enqueued) * 1000,
                    infer_ms=infer_ms,
                    batch_size=len(batch),
                )
            )
