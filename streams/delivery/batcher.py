"""The router: tokenizes texts, queues them, picks micro-batches by length, runs the engine.

Each text is tokenized once, on a tokenizer thread (never on the event loop), and the engine
gets those tokens with the batch. A batch is formed when `max_batch_size` texts are queued,
when the queue's padded token cost (longest text x count) reaches `max_batch_tokens`, or as
soon as the engine is idle and no text already received is still being tokenized: the engine
never idles waiting for texts that have not arrived. Texts that arrive while it runs a batch
queue up and form the next one, so batches grow with the load by themselves (continuous
batching, as in text-embeddings-inference). `max_wait_ms` bounds how long the oldest text
waits for a tokenizer round in progress; with `hold_when_idle` it also waits that long for
company on an idle engine (the older policy: it cost the 50 %-load latency test a full
`max_wait_ms` per event on the CPU, see docs/benchmarks.md).

With `length_aware` (the default) the batch is the oldest queued text plus the queued texts
closest to it in length, so a batch of similar lengths wastes little on padding; the oldest
text is always in the next batch, so no text starves (it waits at most for the texts queued
before it). Without it, batches are first-in-first-out. Either way a batch never costs more
than `max_batch_tokens` padded tokens (a single text always fits).

With a latency target (`INFLOW_LATENCY_TARGET_MS`, streams.delivery.latency) those three knobs are
bounds: each batch's size, token budget and wait are chosen within them from the measured
batch times, queue and p99.

The blocking engine runs on dedicated threads, as many as batches it may run at once
(`Engine.concurrent_batches`: onnxruntime runs one batch per core, each on one thread, by
default; TensorRT one); "idle" above means a free one. The event loop only awaits results.
An engine swap (`swap_engine`) lets the batches in progress finish, starts no new one, and
loads the new version on an engine thread, so a new version takes over strictly between
batches: no batch is split across versions (texts tokenized by the old engine are tokenized
again by the new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from engines.types import BatchResult, Engine, ModelIdentity, Passage, TokenizedText

if TYPE_CHECKING:
    from streams.delivery.latency import LatencyTarget


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_batch_tokens: int = 4096
    max_wait_ms: int = 25
    length_aware: bool = True
    hold_when_idle: bool = False  # wait max_wait_ms for company even when the engine is idle


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The limits for the next batch: the policy's own, or chosen within it by a latency
    target (streams.delivery.latency)."""

    max_batch_size: int
    max_batch_tokens: int
    hold_ms: float  # how long an idle engine waits for company (0: it never waits)


@dataclass(frozen=True, slots=True)
class BatchCost:
    """What one batch cost: its texts, their real tokens, the padded tokens the engine ran."""

    size: int
    infer_ms: float
    real_tokens: int
    padded_tokens: int


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One text's answer, with where its time went."""

    label: str | None  # None from an embedding engine
    scores: dict[str, float]
    embedding: npt.NDArray[np.float32]
    truncated: bool
    model: ModelIdentity
    queue_ms: float
    infer_ms: float
    batch_size: int
    passages: list[Passage] | None = None  # with INFLOW_PASSAGES_MAX > 1


@dataclass(slots=True, eq=False)
class _Item:
    text: str
    future: asyncio.Future[ItemResult]
    enqueued: float = field(default_factory=time.perf_counter)
    tokens: TokenizedText | None = None  # set on the tokenizer thread's return
    length: int = 0  # len(tokens)
    tokenized_by: Engine | None = None  # tokens are valid for this engine only


@dataclass(slots=True)
class BatcherStats:
    batches: int = 0
    texts: int = 0
    failed_batches: int = 0
    infer_seconds: float = 0.0
    tokenize_seconds: float = 0.0  # on the tokenizer thread
    real_tokens: int = 0
    padded_tokens: int = 0  # longest x count per batch: what the engine computed
    batch_size_histogram: dict[int, int] = field(default_factory=dict)

    @property
    def padding_ratio(self) -> float:
        """Padded tokens per real token (1.0 = no padding at all)."""
        return self.padded_tokens / self.real_tokens if self.real_tokens else 0.0


class InferenceFailed(Exception):
    """The engine raised for this text even when run alone."""


class NoEngine(RuntimeError):
    """Asked to run before the first engine was loaded (the worker waits for one)."""


def _engine_threads(slots: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=slots, thread_name_prefix="inflow-engine")


class Batcher:
    """Explicit lifecycle: `start()` spawns the batching task, `stop()` drains then stops."""

    def __init__(
        self,
        engine: Engine | None,
        policy: BatchPolicy,
        on_batch: Callable[[BatchCost], object] | None = None,
        target: LatencyTarget | None = None,
    ) -> None:
        """`engine` may be None: a worker started before any engine exists gets one later
        through `swap_engine`, and nothing is submitted until then. With `target`, each
        batch's limits are chosen within `policy` to hold a p99 (streams.delivery.latency)."""
        if policy.max_batch_size < 1 or policy.max_batch_tokens < 1 or policy.max_wait_ms < 0:
            raise ValueError(f"invalid batch policy {policy}")
        self._requested = policy
        self._engine = engine
        self.policy = self._fit(policy, engine)
        self._incoming: list[_Item] = []  # submitted, not yet tokenized
        self._pending: list[_Item] = []  # tokenized, waiting for a batch (oldest first)
        self._wakeup = asyncio.Event()
        self._slots = 1 if engine is None else max(1, engine.concurrent_batches)
        self._thread = _engine_threads(self._slots)
        self._running: set[asyncio.Task[None]] = set()  # batches on the engine threads
        self._swap = asyncio.Lock()  # while held, no new batch starts (see swap_engine)
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inflow-tokenize")
        self._task: asyncio.Task[None] | None = None
        self._tokenizing: asyncio.Task[None] | None = None
        self._stopping = False
        self._engine_lock = threading.Lock()  # guards _engine between the loop and the thread
        self.stats = BatcherStats()
        self._on_batch = on_batch  # for metrics
        self.target = target
        if target is not None:
            target.bounds = self.policy

    @staticmethod
    def _fit(policy: BatchPolicy, engine: Engine | None) -> BatchPolicy:
        """The router lowers its limits to what the backend supports."""
        if engine is None:
            return policy
        return dataclasses.replace(
            policy, max_batch_size=min(policy.max_batch_size, engine.max_batch_size)
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
        return len(self._pending) + len(self._incoming)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="inflow-batcher")

    async def stop(self) -> None:
        """Answer everything already queued, then stop the threads. Safe to call twice."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._thread.shutdown(wait=True)
        self._tokenizer.shutdown(wait=True)

    async def submit(self, text: str) -> ItemResult:
        if self._stopping:
            raise RuntimeError("batcher is stopping")
        self.engine  # noqa: B018 - raises NoEngine before anything is queued
        item = _Item(text, asyncio.get_running_loop().create_future())
        self._incoming.append(item)
        if self.target is not None:
            self.target.observe_arrival()
        if self._tokenizing is None or self._tokenizing.done():
            self._tokenizing = asyncio.create_task(self._tokenize(), name="inflow-tokenize")
        return await item.future

    # ----------------------------------------------------------------- tokenizing

    async def _tokenize(self) -> None:
        """Tokenize what was submitted, in rounds (one thread call per round), off the loop."""
        loop = asyncio.get_running_loop()
        try:
            while self._incoming:
                items, self._incoming = self._incoming, []
                engine = self.engine
                texts = [item.text for item in items]
                started = time.perf_counter()
                try:
                    tokens = await loop.run_in_executor(self._tokenizer, engine.tokenize, texts)
                except Exception:
                    await self._tokenize_one_by_one(loop, engine, items)
                else:
                    for item, tokenized in zip(items, tokens, strict=True):
                        item.tokens, item.length = tokenized, len(tokenized)
                        item.tokenized_by = engine
                    self._pending.extend(items)
                self.stats.tokenize_seconds += time.perf_counter() - started
                self._wakeup.set()
        finally:
            self._wakeup.set()  # the batching loop may be waiting for this round to end

    async def _tokenize_one_by_one(
        self, loop: asyncio.AbstractEventLoop, engine: Engine, items: list[_Item]
    ) -> None:
        """A round failed: find the text the tokenizer refuses; the others go on."""
        for item in items:
            try:
                tokens = await loop.run_in_executor(self._tokenizer, engine.tokenize, [item.text])
            except Exception as exc:
                self._fail(item, exc)
                continue
            item.tokens, item.length = tokens[0], len(tokens[0])
            item.tokenized_by = engine
            self._pending.append(item)

    def observe_latency(self, ms: float) -> None:
        """One event's "record taken -> prediction acknowledged" time, for the target."""
        if self.target is not None:
            self.target.observe_latency(ms)

    async def embed_query(self, text: str) -> list[float]:
        """An embedding for search (runs on the engine thread, between batches)."""
        result = await self.submit(text)
        return [float(x) for x in result.embedding]

    async def swap_engine(self, load: Callable[[], Engine]) -> ModelIdentity:
        """Load a new engine on an engine thread and switch to it between batches."""
        loop = asyncio.get_running_loop()

        def load_and_swap() -> tuple[Engine | None, Engine]:
            new = load()
            with self._engine_lock:
                old, self._engine = self._engine, new
                self.policy = self._fit(self._requested, new)
            return old, new

        try:
            async with self._swap:
                await self._running_finished()
                old, new = await loop.run_in_executor(self._thread, load_and_swap)
                slots = max(1, new.concurrent_batches)
                if slots != self._slots:  # the old threads are idle: nothing runs
                    self._thread.shutdown(wait=False)
                    self._slots, self._thread = slots, _engine_threads(slots)
                if self.target is not None:  # a new engine: batch times are measured anew
                    self.target.restart(self.policy)
        finally:
            self._wakeup.set()  # the batching loop waits for the swap to end
        if old is not None and old is not new:
            old.close()
        return new.identity

    # ----------------------------------------------------------------- batching loop

    def _queued_tokens(self) -> int:
        """The padded tokens of the whole queue as one batch (longest x count)."""
        return max(item.length for item in self._pending) * len(self._pending)

    def _limits(self, queued_tokens: int) -> BatchLimits:
        """This batch's limits: the policy's, or the latency target's choice within it."""
        policy = self.policy
        if self.target is None:
            hold = float(policy.max_wait_ms) if policy.hold_when_idle else 0.0
            return BatchLimits(policy.max_batch_size, policy.max_batch_tokens, hold)
        return self.target.limits(queued_tokens, self._slots)

    def _take_batch(self, limits: BatchLimits) -> list[_Item]:
        """The next batch, removed from the queue: see the module docstring."""
        pending, policy = self._pending, self.policy
        if not pending:
            return []
        oldest = pending[0]
        if policy.length_aware:
            # Closest in length to the oldest text first, older first among equals.
            others = sorted(
                range(1, len(pending)),
                key=lambda i: (abs(pending[i].length - oldest.length), i),
            )
        else:
            others = list(range(1, len(pending)))
        chosen, longest = [0], oldest.length
        for i in others:
            if len(chosen) >= limits.max_batch_size:
                break
            widest = max(longest, pending[i].length)
            if widest * (len(chosen) + 1) > limits.max_batch_tokens:
                if policy.length_aware:
                    continue  # a text closer in length may still fit
                break
            chosen.append(i)
            longest = widest
        taken = set(chosen)
        self._pending = [item for i, item in enumerate(pending) if i not in taken]
        return [pending[i] for i in sorted(chosen)]

    def _wait_left_ms(self, limits: BatchLimits, queued_tokens: int) -> float:
        """Called only while an engine thread is free (see `_run`): how much longer the
        queue waits before it runs as a batch (0: now)."""
        if not self._pending:
            return math.inf
        if self._stopping or len(self._pending) >= limits.max_batch_size:
            return 0.0
        if queued_tokens >= limits.max_batch_tokens:
            return 0.0
        waited_ms = (time.perf_counter() - self._pending[0].enqueued) * 1000
        if self._still_tokenizing():  # texts already received: wait for them a while
            return max(0.0, self.policy.max_wait_ms - waited_ms)
        # Nothing else has arrived: waiting only idles the engine, unless the limits say a
        # companion is worth it.
        return max(0.0, limits.hold_ms - waited_ms)

    def _still_tokenizing(self) -> bool:
        return bool(self._incoming) or (
            self._tokenizing is not None and not self._tokenizing.done()
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._swap.locked() or len(self._running) >= self._slots:
                self._wakeup.clear()  # set again when a batch ends or the swap is done
                await self._wakeup.wait()
                continue
            if not self._pending:
                if self._stopping and not self._still_tokenizing():
                    await self._running_finished()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            queued_tokens = self._queued_tokens()
            limits = self._limits(queued_tokens)
            wait_ms = self._wait_left_ms(limits, queued_tokens)
            if wait_ms > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait_ms / 1000)
                continue
            batch = [item for item in self._take_batch(limits) if not item.future.cancelled()]
            if batch:
                task = asyncio.create_task(self._infer(loop, batch), name="inflow-batch")
                self._running.add(task)
                task.add_done_callback(self._batch_done)

    async def _running_finished(self) -> None:
        while self._running:
            await asyncio.wait(set(self._running))

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wakeup.set()

    async def _infer(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._thread, self._predict, batch)
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
            result = await loop.run_in_executor(self._thread, self._predict, [item])
        except Exception as exc:
            self._fail(item, exc)
            return
        self._deliver([item], result, started)

    @staticmethod
    def _fail(item: _Item, exc: Exception) -> None:
        if not item.future.done():
            message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
            item.future.set_exception(InferenceFailed(message))

    def _predict(self, batch: Sequence[_Item]) -> BatchResult:
        """On an engine thread: the batch with its tokens when the serving engine made them."""
        engine = self.engine
        texts = [item.text for item in batch]
        tokens = [
            item.tokens for item in batch if item.tokens is not None and item.tokenized_by is engine
        ]
        if len(tokens) == len(batch):
            return engine.predict(texts, tokens)
        return engine.predict(texts)  # tokenized by an engine swapped out since

    def _deliver(self, batch: list[_Item], result: BatchResult, started: float) -> None:
        finished = time.perf_counter()
        infer_ms = (finished - started) * 1000
        real = sum(item.length for item in batch)
        padded = max(item.length for item in batch) * len(batch)
        stats = self.stats
        stats.batches += 1
        stats.texts += len(batch)
        stats.infer_seconds += finished - started
        stats.real_tokens += real
        stats.padded_tokens += padded
        stats.batch_size_histogram[len(batch)] = stats.batch_size_histogram.get(len(batch), 0) + 1
        cost = BatchCost(len(batch), infer_ms, real, padded)
        if self.target is not None:
            self.target.observe_batch(cost)
        if self._on_batch is not None:
            self._on_batch(cost)
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
                    passages=None if result.passages is None else result.passages[i],
                )
            )
