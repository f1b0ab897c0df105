"""The retry policy, the in-flight ceiling and the outage log filter, without I/O."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from indexer import BulkOutcome
from indexer.errors import IndexRequestError, IndexSetupError, IndexUnavailable
from streams.delivery.flow import InFlightBudget
from streams.delivery.index import IndexStage
from streams.delivery.infer import InputRecord
from streams.delivery.retry import RetryPolicy, is_retriable
from streams.ops.logs import RepeatFilter
from streams.ops.metrics import Metrics
from tests.fakes import FakePublisher
from tests.unit.test_stages import _predictions

FAST = RetryPolicy(base_s=0.001, cap_s=0.002, recheck_s=0.05)


def test_retriable_reads_the_flags_and_the_kind_of_failure() -> None:
    assert is_retriable(IndexUnavailable("down", attempts=8, pending_ids=[]))
    assert not is_retriable(IndexRequestError("401", status=401))
    assert not is_retriable(IndexSetupError("an index holds the alias name"))
    assert is_retriable(KafkaConnectionError())
    assert not is_retriable(TopicAuthorizationFailedError())
    assert is_retriable(ConnectionError("reset")) and is_retriable(TimeoutError())
    assert not is_retriable(ValueError("a bug is not retried"))


async def test_retriable_errors_are_retried_with_a_count_not_a_flood(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= 20:
            raise ConnectionError("broker unavailable")
        return "sent"

    with caplog.at_level(logging.WARNING, logger="streams.delivery.retry"):
        assert await FAST.call(flaky, what="publish", condition="publish") == "sent"
    lines = [r.getMessage() for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert calls == 21
    assert [line.split("attempt ")[1].split(",")[0] for line in lines] == ["1", "2", "4", "8", "16"]


async def test_a_permanent_system_error_parks_once_not_ready_then_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    faults: list[tuple[str, str | None]] = []
    policy = RetryPolicy(0.001, 0.002, recheck_s=0.05, on_fault=lambda n, r: faults.append((n, r)))
    calls = 0

    async def refused() -> str:
        nonlocal calls
        calls += 1
        if calls <= 6:
            raise IndexRequestError("bulk refused: HTTP 401", status=401)
        return "indexed"

    with caplog.at_level(logging.WARNING, logger="streams.delivery.retry"):
        task = asyncio.create_task(policy.call(refused, what="bulk index", condition="index"))
        await asyncio.sleep(0.12)
        assert not task.done(), "parked, not given up and not acked"
        assert calls <= 4, "checked again slowly, not in a tight loop"
        assert await task == "indexed"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "one clear line, however long it lasts"
    assert "permanent error" in errors[0].getMessage() and "HTTP 401" in errors[0].getMessage()
    assert faults == [
        ("index", "bulk index: IndexRequestError: bulk refused: HTTP 401"),
        ("index", None),
    ]


async def test_a_per_record_permanent_error_is_raised_for_the_dead_letter() -> None:
    async def too_big() -> None:
        raise ValueError("this one record can never pass")

    with pytest.raises(ValueError):
        await FAST.call(too_big, what="x", condition="c", per_record=lambda e: True)


class RefusingWriter:
    def __init__(self) -> None:
        self.calls = 0

    async def bulk_index(self, docs: Sequence[Mapping[str, Any]]) -> BulkOutcome:
        self.calls += 1
        raise IndexRequestError("bulk refused: HTTP 403 security_exception", status=403)


async def test_index_stage_with_a_refusing_index_acks_nothing_and_is_not_ready() -> None:
    faults: dict[str, str | None] = {}
    retry = RetryPolicy(0.001, 0.002, recheck_s=10, on_fault=faults.__setitem__)
    writer = RefusingWriter()
    acked: list[int] = []
    stage = IndexStage(writer, FakePublisher(), "dlq", Metrics(), retry)
    values = await _predictions(3)
    records = [
        InputRecord("preds", 0, i, b"k", value, lambda i=i: acked.append(i))
        for i, value in enumerate(values)
    ]
    task = asyncio.create_task(stage.handle_batch(records))
    await asyncio.sleep(0.3)
    assert acked == [] and writer.calls == 1
    assert "HTTP 403" in (faults.get("index") or "")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert acked == []


async def test_index_stage_dead_letters_a_tombstone_as_a_tombstone() -> None:
    publisher = FakePublisher()
    stage = IndexStage(RefusingWriter(), publisher, "dlq", Metrics())
    await stage.handle_batch([InputRecord("preds", 0, 7, b"gone", None, lambda: None)])
    [(_, key, value, _)] = publisher.on("dlq")
    assert key == b"gone" and value is None


async def test_the_ceiling_pauses_takers_until_acks_make_room() -> None:
    budget = InFlightBudget(10_000)
    await budget.acquire(6_000)
    waiting = asyncio.create_task(budget.acquire(6_000))
    await asyncio.sleep(0.01)
    assert not waiting.done() and budget.pauses == 1
    budget.release(6_000)
    await asyncio.wait_for(waiting, 1)
    assert budget.used == 6_000 and budget.peak == 6_000
    big = asyncio.create_task(budget.acquire(50_000))  # bigger than the ceiling: waits for 0
    await asyncio.sleep(0.01)
    assert not big.done()
    budget.release(6_000)
    await asyncio.wait_for(big, 1)
    assert budget.used == 50_000


def test_repeats_are_one_line_and_a_count() -> None:
    repeat = RepeatFilter(quiet_s=60)
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    handler = Keep()
    handler.addFilter(repeat)
    noisy = logging.getLogger("aiokafka.conn.test")
    ours = logging.getLogger("streams.test")
    for logger in (noisy, ours):
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)  # whatever earlier tests did to the "aiokafka" level
    try:
        for _ in range(2302):
            noisy.error("Unable connect to node with id %s: %s", 1, "refused")
        ours.error("ours always passes")
        ours.error("ours always passes")
        repeat.flush(now=float("inf"))
    finally:
        for logger in (noisy, ours):
            logger.removeHandler(handler)
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
    assert kept[0] == "Unable connect to node with id 1: refused"
    assert kept[1:3] == ["ours always passes"] * 2
    assert kept[3].startswith("Unable connect to node with id 1: refused (repeated 2301 more")
    assert len(kept) == 4
