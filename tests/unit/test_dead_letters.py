"""Per-record permanent errors end as dead letters with their own codes; dead letters fit.

The infer stage with fakes of our own interfaces (Publisher, Engine): a prediction over the
predictions topic's limit, a broker that refuses one record for its size, a record whose
processing raises, and dead letters larger than their own topic.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from aiokafka.errors import MessageSizeTooLargeError, TopicAuthorizationFailedError

from schemas import encode_event, parse_dead_letter_headers
from streams.delivery.batcher import Batcher, BatchPolicy
from streams.delivery.deadletter import DeadLetterTooLarge, fit_dead_letter
from streams.delivery.infer import InferStage, InferTopics
from streams.delivery.records import InputRecord, RecordLimits, record_size
from streams.delivery.retry import RetryPolicy
from streams.ops.metrics import Metrics
from tests.fakes import FakeEngine, FakePublisher

TOPICS = InferTopics("preds", "texts.dlq")


def refusing(topic: str, max_value: int, error: Exception) -> FakePublisher:
    """A publisher whose `topic` refuses values larger than `max_value` with `error`."""
    return FakePublisher(
        refuse=lambda t, _key, value: (
            error if t == topic and len(value or b"") > max_value else None
        )
    )


async def _run(
    values: list[bytes],
    publisher: FakePublisher,
    limits: RecordLimits | None = None,
    *,
    timeout_s: float = 10.0,
) -> list[int]:
    batcher = Batcher(FakeEngine(), BatchPolicy(8, 10_000, 5))
    stage = InferStage(
        batcher,
        publisher,
        TOPICS,
        Metrics(),
        max_in_flight=16,
        retry=RetryPolicy(base_s=0.01, cap_s=0.05, recheck_s=0.05),
        limits=limits,
    )
    await batcher.start()
    answered: list[int] = []
    for offset, value in enumerate(values):
        record = InputRecord(
            "texts", 0, offset, f"k{offset}".encode(), value, lambda o=offset: answered.append(o)
        )
        await stage.handle(record)
    try:
        await asyncio.wait_for(stage.drain(), timeout_s)
    except TimeoutError:
        await stage.stop(0.1)
    await batcher.stop()
    return answered


def _codes(publisher: FakePublisher) -> list[str]:
    return [
        parse_dead_letter_headers(headers or [])["inflow.error.code"]
        for _, _, _, headers in publisher.on("texts.dlq")
    ]


async def test_a_prediction_over_the_topics_limit_is_dead_lettered_before_sending() -> None:
    small = encode_event("i love it", id="small")
    big = encode_event("i love it", id="big", metadata={"pad": "x" * 20_000})
    publisher = FakePublisher()
    limits = RecordLimits(topics={"preds": 15_000, "texts.dlq": 100_000})
    answered = await _run([small, big, small], publisher, limits)
    assert sorted(answered) == [0, 1, 2]
    assert [key for _, key, _, _ in publisher.on("preds")] == [b"small", b"small"]
    assert _codes(publisher) == ["prediction_too_large"]
    (_, key, value, headers) = publisher.on("texts.dlq")[0]
    parsed = parse_dead_letter_headers(headers or [])
    assert value == big and key == b"k1", "the original bytes, whole: they fit the DLQ"
    assert parsed["inflow.error.stage"] == "publish" and "15000" in parsed["inflow.error.message"]
    assert parsed["inflow.engine.version"] == "v-test"


async def test_a_broker_refusal_for_size_dead_letters_that_record_only() -> None:
    """Limits that did not foresee it (a topic changed after start): the refusal comes back
    as that record's own error, never parks it."""
    values = [
        encode_event("i love it", id=f"id-{i}", metadata={"n": "y" * (i * 900)}) for i in range(4)
    ]
    publisher = refusing("preds", 7_000, MessageSizeTooLargeError("too large"))
    answered = await _run(values, publisher)
    assert sorted(answered) == [0, 1, 2, 3]
    assert publisher.refused >= 1
    predicted = {key for _, key, _, _ in publisher.on("preds")}
    dead = publisher.on("texts.dlq")
    assert len(predicted) + len(dead) == 4 and _codes(publisher) == ["prediction_too_large"] * len(
        dead
    )


async def test_a_record_whose_processing_raises_is_one_dead_letter() -> None:
    """e.g. a bug met by one record's data: it does not escape the stage, nor skip the record."""

    batcher = Batcher(FakeEngine(), BatchPolicy(8, 10_000, 5))
    publisher = FakePublisher()
    stage = InferStage(batcher, publisher, TOPICS, Metrics(), max_in_flight=4)
    original = stage._answer

    async def answer(record: InputRecord, taken: float) -> None:
        if b"boom" in (record.value or b""):
            raise KeyError("a bug met by this record")
        await original(record, taken)

    stage._answer = answer  # type: ignore[method-assign]
    await batcher.start()
    answered: list[int] = []
    for offset, text in enumerate(["i love it", "boom", "i hate it"]):
        await stage.handle(
            InputRecord(
                "texts", 0, offset, None, encode_event(text), lambda o=offset: answered.append(o)
            )
        )
    await stage.drain()
    await batcher.stop()
    assert sorted(answered) == [0, 1, 2]
    assert _codes(publisher) == ["processing_failed"]
    assert (
        "KeyError"
        in parse_dead_letter_headers(publisher.on("texts.dlq")[0][3] or [])["inflow.error.message"]
    )


async def test_a_dead_letter_too_large_for_its_topic_keeps_a_prefix_and_says_so() -> None:
    bad = b'{"text": ' + b"x" * 50_000  # poison: invalid JSON, larger than the DLQ takes
    publisher = FakePublisher()
    answered = await _run([bad], publisher, RecordLimits(topics={"texts.dlq": 10_000}))
    assert answered == [0]
    ((_, key, value, headers),) = publisher.on("texts.dlq")
    parsed = parse_dead_letter_headers(headers or [])
    assert parsed["inflow.error.code"] == "invalid_json"
    assert parsed["inflow.dlq.truncated"] == "true"
    assert parsed["inflow.original.size"] == str(len(bad))
    assert parsed["inflow.original.sha256"] == hashlib.sha256(bad).hexdigest()
    assert value is not None and bad.startswith(value) and len(value) > 9_000
    assert record_size(key, value, headers) <= 10_000


async def test_a_refusing_dead_letter_topic_parks_the_record_unanswered() -> None:
    """A permanent error of the system (not this record's): never dropped, never answered."""
    publisher = refusing("texts.dlq", -1, TopicAuthorizationFailedError("denied"))
    answered = await _run([b"{not json", encode_event("i love it")], publisher, timeout_s=0.5)
    assert answered == [1], "the good record is answered; the poison one waits"
    assert publisher.on("texts.dlq") == []


def test_fit_dead_letter() -> None:
    headers = [("inflow.error.code", b"invalid_json")]
    assert fit_dead_letter(1_000, b"k", b"v" * 100, headers) == (b"k", b"v" * 100, headers)
    key, value, fitted = fit_dead_letter(1_000, b"k" * 2_000, b"v" * 5_000, headers)
    assert value == b"" and key is not None and key != b"k" * 2_000
    assert record_size(key, value, fitted) <= 1_000
    key, value, fitted = fit_dead_letter(1_000, None, None, headers)
    assert (key, value, fitted) == (None, None, headers), "a tombstone stays a tombstone"
    with pytest.raises(DeadLetterTooLarge, match=r"max\.message\.bytes"):
        fit_dead_letter(150, b"k", b"v" * 1_000, headers)
