from __future__ import annotations

import asyncio

import pytest

from streams.batcher import Batcher, BatchPolicy, InferenceFailed
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


async def test_a_lone_text_waits_at_most_max_wait() -> None:
    engine = FakeEngine()
    batcher = Batcher(
        engine, BatchPolicy(max_batch_size=64, max_batch_tokens=10_000, max_wait_ms=30)
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
