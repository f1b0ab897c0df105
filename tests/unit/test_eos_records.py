"""Exactly-once: the outputs of one transaction hold an answer for every record of its batch.

Before, `_predict` waited with a gather that dropped errors: a record whose processing raised
got no output and the transaction committed past it. Now the infer stage turns it into a dead
letter (`processing_failed`) inside the batch, and a record left unanswered fails the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas import encode_event, parse_dead_letter_headers
from streams.config import Settings
from streams.delivery.batcher import Batcher, BatchPolicy, ItemResult
from streams.delivery.eos import TransactionalInfer
from streams.ops.metrics import Metrics
from tests.fakes import FakeEngine


@dataclass
class Message:  # the fields of an aiokafka ConsumerRecord that the loop reads
    offset: int
    value: bytes | None
    key: bytes | None = None
    topic: str = "texts"
    partition: int = 0
    timestamp: int = 1_700_000_000_000
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class BrokenRollout:
    """A rollout (our interface) with a bug met by one key."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher

    async def submit(self, key: bytes, text: str) -> ItemResult:
        if key == b"bug":
            raise ZeroDivisionError("a bug met by this record")
        return await self._batcher.submit(text)


async def test_a_record_whose_processing_raises_is_dead_lettered_in_the_transaction() -> None:
    batcher = Batcher(FakeEngine(), BatchPolicy(8, 10_000, 5))
    settings = Settings(texts_dlq_topic="texts.dlq", predictions_topic="preds")
    eos = TransactionalInfer(settings, batcher, Metrics(), rollout=BrokenRollout(batcher))  # type: ignore[arg-type]
    await batcher.start()
    try:
        messages = [
            Message(0, encode_event("i love it", id="a"), b"a"),
            Message(1, encode_event("i hate it", id="bug"), b"bug"),
            Message(2, b"{not json", b"c"),
            Message(3, encode_event("fine", id="d"), b"d"),
        ]
        outputs = await eos._predict(messages)
    finally:
        await batcher.stop()
    predicted = sorted(key for topic, key, _, _ in outputs if topic == "preds")
    dead = {
        key: parse_dead_letter_headers(headers or [])["inflow.error.code"]
        for topic, key, _, headers in outputs
        if topic == "texts.dlq"
    }
    assert predicted == [b"a", b"d"]
    assert dead == {b"bug": "processing_failed", b"c": "invalid_json"}
