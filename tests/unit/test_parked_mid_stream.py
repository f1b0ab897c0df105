"""A record parked mid-stream: records answered before it, one parked by a permanent error of the
system, more answered behind it. Faust's own commit code (through the offset ledger) must
commit the answered prefix, stop right before the parked record while the records behind it
are answered, and reach the end once the cause is fixed, every record answered once.

The infer stage with fakes of our own interfaces (Engine, Publisher) and Faust's real
`Consumer.ack` / `_new_offset` / `_should_commit` (`tests.unit.test_ledger.FaustCommitState`).
The e2e version on genuine Kafka is `tests/e2e/test_parked_mid_stream.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import UnknownError

from schemas import Prediction, decode_prediction, encode_event, parse_dead_letter_headers
from streams.delivery.batcher import Batcher, BatchPolicy
from streams.delivery.infer import InferStage, InferTopics
from streams.delivery.ledger import OffsetLedger
from streams.delivery.records import InputRecord
from streams.delivery.retry import RetryPolicy
from streams.ops.metrics import Metrics
from tests.fakes import FakeEngine, FakePublisher
from tests.unit.test_ledger import FaustCommitState, Message

TOPICS = InferTopics("preds", "texts.dlq")
TP = ("texts", 0)
POISON_AT = 10  # records 0..9 answered first; 10 parks; 11..20 come behind it
END = 21


class CompactedDlqPublisher(FakePublisher):
    """A texts dead-letter topic that refuses keyless records (what a compacted topic on a real
    broker answers: INVALID_RECORD, which aiokafka reports as UnknownError) until `fixed`."""

    def __init__(self) -> None:
        super().__init__(refuse=self._compacted)
        self.fixed = False

    def _compacted(self, topic: str, key: bytes | None, _value: bytes | None) -> Exception | None:
        refused = topic == TOPICS.dead_letters and key is None and not self.fixed
        return UnknownError() if refused else None


class Consumer:
    """The worker's consumer side: records taken through the ledger (or, `through_ledger=False`,
    acked to Faust in completion order), Faust's commit code deciding the committed offset."""

    def __init__(self, through_ledger: bool) -> None:
        self.faust: Any = FaustCommitState()  # Faust's methods on a stand-in of its state
        self.ledger = OffsetLedger()
        self.through_ledger = through_ledger
        self.answers: list[int] = []

    def take(self, offset: int) -> Callable[[], None]:
        message = Message(TP, offset)
        self.faust._read_offset[TP] = offset
        self.faust._unacked_messages.add(message)

        def ack() -> None:
            self.faust.ack(message)

        release = self.ledger.take(TP, offset, ack) if self.through_ledger else ack

        def answer() -> None:
            self.answers.append(offset)
            release()

        return answer

    def commit(self) -> int | None:
        """One run of Faust's commit timer over the partition; the committed offset after it."""
        for _ in range(3):  # Faust commits one run of consecutive acks per call
            offset = self.faust._new_offset(TP)
            if offset is not None and self.faust._should_commit(TP, offset):
                self.faust._committed_offset[TP] = offset
        committed: int | None = self.faust._committed_offset[TP]
        return committed


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@dataclass
class Run:
    consumer: Consumer
    publisher: CompactedDlqPublisher
    stage: InferStage
    batcher: Batcher

    async def close(self) -> None:
        await self.stage.stop(1.0)
        await self.batcher.stop()


async def _parked_mid_stream(through_ledger: bool) -> Run:
    """Runs the scenario up to the parked state (the stage keeps running: close the run)."""
    publisher = CompactedDlqPublisher()
    batcher = Batcher(FakeEngine(), BatchPolicy(8, 10_000, 5))
    stage = InferStage(
        batcher,
        publisher,
        TOPICS,
        Metrics(),
        max_in_flight=64,
        retry=RetryPolicy(base_s=0.001, cap_s=0.005, recheck_s=0.05),
    )
    await batcher.start()
    consumer = Consumer(through_ledger)
    run = Run(consumer, publisher, stage, batcher)

    def record(offset: int) -> InputRecord:
        if offset == POISON_AT:  # keyless poison: its dead letter has no key either
            return InputRecord("texts", 0, offset, None, b"{not json", consumer.take(offset))
        eid = f"e-{offset}"
        value = encode_event(f"a pleasant review number {offset}", id=eid)
        return InputRecord("texts", 0, offset, eid.encode(), value, consumer.take(offset))

    try:
        for offset in range(POISON_AT):
            await stage.handle(record(offset))
        await _until(lambda: len(consumer.answers) == POISON_AT)
        assert consumer.commit() == POISON_AT, "the answered prefix is committed"
        for offset in range(POISON_AT, END):
            await stage.handle(record(offset))
        await _until(lambda: len(consumer.answers) == END - 1 and publisher.refused >= 2)
    except BaseException:
        await run.close()
        raise
    return run


async def test_a_record_parked_mid_stream_holds_the_commit_right_before_it() -> None:
    run = await _parked_mid_stream(through_ledger=True)
    consumer, publisher = run.consumer, run.publisher
    try:
        # The records behind the parked one are answered (their predictions are out) ...
        assert sorted(consumer.answers) == [o for o in range(END) if o != POISON_AT]
        predicted = [decode_prediction(value or b"") for _, _, value, _ in publisher.on("preds")]
        assert {p.id for p in predicted if isinstance(p, Prediction)} == {
            f"e-{o}" for o in range(END) if o != POISON_AT
        }
        # ... and Faust's commit stops right before the parked record, however often it runs.
        for _ in range(5):
            assert consumer.commit() == POISON_AT
            await asyncio.sleep(0.06)  # a recheck of the parked call comes and goes
        assert consumer.ledger.released_up_to(TP) == POISON_AT
        assert consumer.ledger.unanswered() == [(TP, POISON_AT)]

        # The cause fixed: the next recheck sends the dead letter, the commit reaches the end.
        publisher.fixed = True
        await _until(lambda: len(consumer.answers) == END)
        assert consumer.commit() == END
        assert sorted(consumer.answers) == list(range(END)), "every record answered once"
        ((_, key, value, headers),) = publisher.on(TOPICS.dead_letters)
        parsed = parse_dead_letter_headers(headers or [])
        assert key is None and value == b"{not json"
        assert parsed["inflow.error.code"] == "invalid_json"
        assert parsed["inflow.source.offset"] == str(POISON_AT)
        assert len(publisher.on("preds")) == END - 1, "each prediction once"
    finally:
        await run.close()


async def test_without_the_ledger_faust_commits_past_the_parked_record() -> None:
    """Why the ledger: acked to Faust in completion order, the same run commits past the
    parked record (committed 10, acked 11..20: Faust's rule only holds back a gap of more
    than one, faust #606). A crash then would lose record 10."""
    run = await _parked_mid_stream(through_ledger=False)
    try:
        assert run.consumer.commit() == END
    finally:
        await run.close()
