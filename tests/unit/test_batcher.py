from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from engines.types import BatchResult, TokenizedText
from streams.delivery.batcher import Batcher, BatchPolicy, InferenceFailed, ItemResult
from streams.ops.metrics import Metrics
from tests.fakes import FakeEngine


async def test_full_batches_close_by_count() -> None:
    engine = FakeEngine()
    batcher = Batcher(
        engine, BatchPolicy(max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=1000)
    )
    await batcher.start()
    results = await asyncio.gather(*(batcher.submit(f"text {i}") for i in range(32)))
    await batcher.stop()
    assert [len(batch) for batch in engine.batches] == [8, 8, 8, 8]
    assert [r.batch_size for r in results] == [8] * 32
    # Results are keyed by position: each answer is for its own text.
    assert [r.label for r in results] == ["neutral"] * 32


async def test_token_budget_splits_batches_by_padded_cost() -> None:
    engine = FakeEngine()
    # Each text costs 12 tokens (10 words + 2); a budget of 40 fits 3 texts (36) but not 4 (48).
    batcher = Batcher(engine, BatchPolicy(max_batch_size=64, max_batch_tokens=40, max_wait_ms=1000))
    await batcher.start()
    await asyncio.gather(*(batcher.submit(" ".join(["w"] * 10)) for _ in range(9)))
    await batcher.stop()
    assert [len(batch) for batch in engine.batches] == [3, 3, 3]


async def test_a_lone_text_on_an_idle_engine_goes_at_once() -> None:
    """The engine never idles waiting for texts that have not arrived (a minute's max wait
    would otherwise hold this text far past the timeout)."""
    engine = FakeEngine()
    batcher = Batcher(engine, BatchPolicy(64, 10_000, max_wait_ms=60_000))
    await batcher.start()
    result = await asyncio.wait_for(batcher.submit("alone"), timeout=30)
    await batcher.stop()
    assert result.batch_size == 1


class _GatedEngine(FakeEngine):
    """A FakeEngine whose first batch blocks until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.running = threading.Event()
        self.release = threading.Event()

    def predict(
        self, texts: list[str], tokens: Sequence[TokenizedText] | None = None
    ) -> BatchResult:
        if not self.batches:
            self.running.set()
            self.release.wait(30)
        return super().predict(texts, tokens)


async def test_texts_arriving_while_the_engine_runs_form_the_next_batch() -> None:
    engine = _GatedEngine()
    batcher = Batcher(engine, BatchPolicy(64, 10_000, max_wait_ms=60_000))
    await batcher.start()
    first = asyncio.create_task(batcher.submit("first"))
    await asyncio.get_running_loop().run_in_executor(None, engine.running.wait, 30)
    rest = [asyncio.create_task(batcher.submit(f"t{i}")) for i in range(5)]
    await asyncio.sleep(0)  # all five submitted, in one tokenizer round
    engine.release.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), timeout=30)
    await batcher.stop()
    assert [len(batch) for batch in engine.batches] == [1, 5]


async def test_hold_when_idle_makes_a_lone_text_wait_at_most_max_wait() -> None:
    engine = FakeEngine()
    batcher = Batcher(
        engine,
        BatchPolicy(
            max_batch_size=64, max_batch_tokens=10_000, max_wait_ms=30, hold_when_idle=True
        ),
    )
    await batcher.start()
    result = await asyncio.wait_for(batcher.submit("alone"), timeout=2)
    await batcher.stop()
    assert result.batch_size == 1
    assert 25 <= result.queue_ms < 1000


async def test_engine_runs_on_one_dedicated_thread() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, BatchPolicy(4, 10_000, 5))
    await batcher.start()
    await asyncio.gather(*(batcher.submit(f"t{i}") for i in range(20)))
    await batcher.stop()
    assert len(engine.threads) == 1
    assert next(iter(engine.threads)).startswith("inflow-engine")


async def test_a_poison_text_fails_alone_and_the_rest_of_its_batch_succeeds() -> None:
    engine = FakeEngine(fail_on="poison")
    batcher = Batcher(engine, BatchPolicy(8, 10_000, 1000))
    await batcher.start()
    texts = ["i love it", "poison pill", "i hate it", "plain"] * 2
    results = await asyncio.gather(*(batcher.submit(t) for t in texts), return_exceptions=True)
    await batcher.stop()
    failed = [t for t, r in zip(texts, results, strict=True) if isinstance(r, InferenceFailed)]
    assert failed == ["poison pill", "poison pill"]
    assert batcher.stats.failed_batches == 1
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert [r.label for r in ok] == ["positive", "negative", "neutral"] * 2


async def test_router_lowers_batch_size_to_the_backend_limit() -> None:
    batcher = Batcher(FakeEngine(max_batch_size=4), BatchPolicy(32, 10_000, 5))
    assert batcher.policy.max_batch_size == 4
    await batcher.stop()


async def test_swap_engine_takes_effect_between_batches() -> None:
    old, new = FakeEngine("v1"), FakeEngine("v2")
    batcher = Batcher(old, BatchPolicy(4, 10_000, 1000))
    await batcher.start()
    before = await asyncio.gather(*(batcher.submit(f"a{i}") for i in range(4)))
    identity = await batcher.swap_engine(lambda: new)
    after = await asyncio.gather(*(batcher.submit(f"b{i}") for i in range(4)))
    await batcher.stop()
    assert identity.version == "v2"
    assert {r.model.version for r in before} == {"v1"}
    assert {r.model.version for r in after} == {"v2"}
    assert old.closed and not new.closed


async def test_stop_answers_everything_already_queued() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, BatchPolicy(64, 10_000, 10_000))  # would wait 10 s for a full batch
    await batcher.start()
    pending = [asyncio.create_task(batcher.submit(f"t{i}")) for i in range(5)]
    await asyncio.sleep(0.01)
    await asyncio.wait_for(batcher.stop(), timeout=2)
    assert all(task.done() and not task.exception() for task in pending)
    with pytest.raises(RuntimeError, match="stopping"):
        await batcher.submit("late")


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid batch policy"):
        Batcher(FakeEngine(), BatchPolicy(0, 10, 5))


# ------------------------------------------------------------ length-aware batch selection


def _words(n: int, tag: str) -> str:
    return " ".join([tag] * n)


async def _run_all(engine: FakeEngine, policy: BatchPolicy, texts: list[str]) -> list[ItemResult]:
    batcher = Batcher(engine, policy)
    await batcher.start()
    results = await asyncio.gather(*(batcher.submit(t) for t in texts))
    await batcher.stop()
    return list(results)


async def test_length_aware_batches_group_similar_lengths_and_cut_padding() -> None:
    texts = [_words(1 if i % 2 == 0 else 20, f"t{i}") for i in range(16)]
    fifo, aware = FakeEngine(), FakeEngine()
    fifo_batcher = Batcher(fifo, BatchPolicy(4, 10_000, 1000, length_aware=False))
    metrics = Metrics()
    aware_batcher = Batcher(
        aware, BatchPolicy(4, 10_000, 1000, length_aware=True), on_batch=metrics.observe_batch
    )
    for batcher in (fifo_batcher, aware_batcher):
        await batcher.start()
        await asyncio.gather(*(batcher.submit(t) for t in texts))
        await batcher.stop()
    # First in, first out: every batch mixes short and long texts, padded to the long ones.
    assert fifo_batcher.stats.padding_ratio > 1.5
    # By length: each batch holds one length only, so nothing is padded.
    assert {len({len(t.split()) for t in batch}) for batch in aware.batches} == {1}
    assert aware_batcher.stats.padding_ratio == 1.0
    assert aware_batcher.stats.real_tokens == fifo_batcher.stats.real_tokens
    # The metric counts the same tokens as the batcher's own stats.
    assert metrics.total("inflow_batch_real_tokens_total") == aware_batcher.stats.real_tokens
    assert metrics.total("inflow_batch_padded_tokens_total") == aware_batcher.stats.padded_tokens


async def test_the_oldest_queued_text_is_always_in_the_next_batch() -> None:
    """No starvation: a text of an odd length is not passed over for better-fitting ones."""
    engine = FakeEngine()
    batcher = Batcher(engine, BatchPolicy(4, 10_000, 1000))
    await batcher.start()
    order: list[str] = []

    async def submit(text: str) -> None:
        order.append(text)
        await batcher.submit(text)

    # A long text first, then waves of short ones that would fit together better than with it.
    tasks = [asyncio.create_task(submit(_words(40, "long")))]
    for wave in range(5):
        tasks += [asyncio.create_task(submit(_words(2, f"w{wave}x{i}"))) for i in range(7)]
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    await batcher.stop()
    assert _words(40, "long") in engine.batches[0]
    served: set[str] = set()
    for batch in engine.batches:
        oldest_unserved = next(t for t in order if t not in served)
        assert oldest_unserved in batch
        served.update(batch)
    assert served == set(order)


async def test_a_text_no_batch_fits_beside_still_runs_alone() -> None:
    engine = FakeEngine()
    # 12 tokens each: the budget of 20 fits one text per batch only.
    results = await _run_all(engine, BatchPolicy(8, 20, 1000), [_words(10, "w")] * 3)
    assert [len(b) for b in engine.batches] == [1, 1, 1]
    assert [r.batch_size for r in results] == [1, 1, 1]


@pytest.mark.parametrize("length_aware", [True, False])
async def test_batched_results_equal_one_at_a_time_results(length_aware: bool) -> None:
    texts = [
        _words(1 + (i * 7) % 23, "love" if i % 3 == 0 else "hate" if i % 3 == 1 else f"x{i}")
        for i in range(40)
    ]
    engine = FakeEngine()
    results = await _run_all(engine, BatchPolicy(8, 120, 1000, length_aware), texts)
    assert max(len(b) for b in engine.batches) > 1
    alone = FakeEngine()
    for text, result in zip(texts, results, strict=True):
        single = alone.predict([text])
        assert result.label == single.labels[0]
        assert result.scores == single.scores[0]
        np.testing.assert_array_equal(result.embedding, single.embeddings[0])


async def test_each_text_is_tokenized_once_and_the_engine_gets_the_tokens() -> None:
    engine = FakeEngine()
    await _run_all(engine, BatchPolicy(8, 10_000, 5), [f"text {i}" for i in range(20)])
    # Every batch came with its tokens: the engine never tokenized a text itself.
    assert engine.tokenized == [len(batch) for batch in engine.batches]


async def test_texts_tokenized_by_a_swapped_out_engine_are_tokenized_again() -> None:
    old, new = FakeEngine("v1"), FakeEngine("v2")
    batcher = Batcher(old, BatchPolicy(64, 10_000, 10_000, hold_when_idle=True))
    await batcher.start()
    pending = [asyncio.create_task(batcher.submit(f"t{i}")) for i in range(3)]
    await asyncio.sleep(0.05)  # tokenized by v1, waiting for a fuller batch
    await batcher.swap_engine(lambda: new)
    await batcher.stop()
    assert {task.result().model.version for task in pending} == {"v2"}
    assert new.tokenized == [0]  # v2 tokenized them itself


class _SlowEngine(FakeEngine):
    """Each batch takes 30 ms on its engine thread; counts how many ran at once."""

    def __init__(self, version: str = "v-slow", concurrent_batches: int = 1) -> None:
        super().__init__(version, concurrent_batches=concurrent_batches)
        self._guard = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.finished_at: list[float] = []

    def predict(
        self, texts: list[str], tokens: Sequence[TokenizedText] | None = None
    ) -> BatchResult:
        with self._guard:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.03)
        try:
            return super().predict(texts, tokens)
        finally:
            with self._guard:
                self.running -= 1
                self.finished_at.append(time.perf_counter())


@pytest.mark.parametrize("slots", [1, 2, 3])
async def test_batches_run_side_by_side_up_to_what_the_engine_allows(slots: int) -> None:
    engine = _SlowEngine(concurrent_batches=slots)
    batcher = Batcher(engine, BatchPolicy(4, 10_000, 5))
    await batcher.start()
    results = await asyncio.gather(*(batcher.submit(f"t{i}") for i in range(48)))
    await batcher.stop()
    assert engine.most_at_once == slots
    assert len(engine.threads) == slots
    assert [r.label for r in results] == ["neutral"] * 48


async def test_a_swap_lets_running_batches_finish_and_starts_none_meanwhile() -> None:
    old, new = _SlowEngine("v1", concurrent_batches=2), FakeEngine("v2")
    batcher = Batcher(old, BatchPolicy(2, 10_000, 5))
    await batcher.start()
    first = [asyncio.ensure_future(batcher.submit(f"a{i}")) for i in range(12)]
    await asyncio.sleep(0.01)  # batches of the old engine are running

    loaded_at: list[float] = []

    def load() -> FakeEngine:
        loaded_at.append(time.perf_counter())
        return new

    await batcher.swap_engine(load)
    results = await asyncio.gather(*first, batcher.submit("b"))
    await batcher.stop()
    assert max(old.finished_at) <= loaded_at[0], "an old batch ran while the new one loaded"
    assert old.closed and old.most_at_once == 2
    assert {r.model.version for r in results[:-1]} <= {"v1", "v2"}
    assert results[-1].model.version == "v2"
    assert sum(len(b) for b in old.batches) + sum(len(b) for b in new.batches) == 13
