"""InferStage and IndexStage with fakes of our own interfaces: every record ends exactly once."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from schemas import Prediction, decode_prediction, encode_event, parse_dead_letter_headers
from streams.delivery.batcher import Batcher, BatchPolicy
from streams.delivery.index import IndexBuffer, IndexStage
from streams.delivery.infer import InferStage, InferTopics, InputRecord
from streams.ops.metrics import Metrics
from tests.fakes import FakeEngine, FakePublisher, FakeWriter

TOPICS = InferTopics("preds", "texts.dlq")


class Acks:
    def __init__(self) -> None:
        self.offsets: list[int] = []

    def record(self, offset: int, value: bytes | None, key: bytes | None = None) -> InputRecord:
        return InputRecord("texts", 0, offset, key, value, lambda: self.offsets.append(offset))


async def _run_infer(
    values: list[bytes | None], publisher: FakePublisher, engine: FakeEngine | None = None
) -> tuple[Acks, Metrics]:
    metrics = Metrics()
    batcher = Batcher(engine or FakeEngine(), BatchPolicy(8, 10_000, 5))
    stage = InferStage(batcher, publisher, TOPICS, metrics, max_in_flight=16)
    await batcher.start()
    acks = Acks()
    for offset, value in enumerate(values):
        await stage.handle(acks.record(offset, value, key=f"k{offset}".encode()))
    await stage.drain()
    await batcher.stop()
    return acks, metrics


async def test_each_record_ends_as_one_prediction_or_one_dead_letter() -> None:
    good = [encode_event(f"i love item {i}", id=f"id-{i}", metadata={"n": i}) for i in range(20)]
    bad: list[bytes | None] = [b"{not json", b"\xff\xfe", b"[1,2]", b'{"text": "   "}', b"", None]
    publisher = FakePublisher()
    acks, metrics = await _run_infer([*good, *bad], publisher)

    predictions = publisher.on("preds")
    assert sorted(key for _, key, _, _ in predictions) == sorted(
        f"id-{i}".encode() for i in range(20)
    )
    for _, key, value, _ in predictions:
        prediction = decode_prediction(value)
        assert isinstance(prediction, Prediction), prediction
        assert prediction.id.encode() == key
        assert prediction.label == "positive"
        assert prediction.source.topic == "texts"
        assert prediction.metadata == {"n": int(prediction.id.split("-")[1])}
        assert prediction.model.version == "v-test"

    dead = publisher.on("texts.dlq")
    assert [value for _, _, value, _ in dead] == [
        b"{not json",
        b"\xff\xfe",
        b"[1,2]",
        b'{"text": "   "}',
        b"",
        None,  # a tombstone stays a tombstone
    ]
    codes = [
        parse_dead_letter_headers(headers or [])["inflow.error.code"] for _, _, _, headers in dead
    ]
    assert codes == [
        "invalid_json",
        "invalid_utf8",
        "not_an_object",
        "empty_text",
        "empty_value",
        "empty_value",
    ]
    offsets = [
        int(parse_dead_letter_headers(h or [])["inflow.source.offset"]) for _, _, _, h in dead
    ]
    assert offsets == list(range(20, 26))
    assert [key for _, key, _, _ in dead] == [f"k{o}".encode() for o in range(20, 26)]
    assert sorted(acks.offsets) == list(range(26))  # every record acked exactly once
    assert metrics.total("inflow_dead_letters_total") == 6
    assert metrics.total("inflow_predictions_total") == 20
    dead_by_code = metrics.registry.get_sample_value
    assert dead_by_code("inflow_dead_letters_total", {"code": "empty_value"}) == 2
    assert dead_by_code("inflow_dead_letters_total", {"code": "invalid_json"}) == 1


async def test_ack_waits_for_the_broker_and_publishing_is_retried() -> None:
    publisher = FakePublisher(fail_first=2)
    acks, metrics = await _run_infer([encode_event("hello", id="only")], publisher)
    assert acks.offsets == [0]
    assert len(publisher.on("preds")) == 1
    assert metrics.total("inflow_publish_retries_total") == 2


async def test_end_to_end_latency_is_observed_from_event_time_and_record_time() -> None:
    now_ms = int(time.time() * 1000)
    metrics = Metrics()
    batcher = Batcher(FakeEngine(), BatchPolicy(8, 10_000, 5))
    stage = InferStage(batcher, FakePublisher(), TOPICS, metrics, max_in_flight=16)
    await batcher.start()
    acks = Acks()
    with_ts = encode_event("has an event time", id="a", ts=now_ms - 3_000)
    without_ts = encode_event("no event time", id="b")
    for offset, value in enumerate([with_ts, without_ts]):
        record = acks.record(offset, value)
        await stage.handle(dataclasses.replace(record, timestamp=now_ms / 1000 - 1.0))
    await stage.drain()
    await batcher.stop()
    sample = metrics.registry.get_sample_value
    # Only the event that carries a ts has an event-time latency; both have a record time.
    assert sample("inflow_event_to_published_seconds_count") == 1
    assert 3.0 <= (sample("inflow_event_to_published_seconds_sum") or 0) < 60
    assert sample("inflow_produced_to_published_seconds_count") == 2
    assert 2.0 <= (sample("inflow_produced_to_published_seconds_sum") or 0) < 120


async def test_engine_failure_dead_letters_only_the_poison_text() -> None:
    values = [encode_event(t, id=t) for t in ("fine one", "poison here", "fine two")]
    publisher = FakePublisher()
    acks, _ = await _run_infer(values, publisher, FakeEngine(fail_on="poison"))
    assert [key for _, key, _, _ in publisher.on("preds")] == [b"fine one", b"fine two"]
    [(_, _, value, headers)] = publisher.on("texts.dlq")
    assert value == values[1]
    parsed = parse_dead_letter_headers(headers or [])
    assert parsed["inflow.error.code"] == "inference_failed"
    assert parsed["inflow.error.stage"] == "infer"
    assert sorted(acks.offsets) == [0, 1, 2]


async def _predictions(n: int, label_of: dict[int, str] | None = None) -> list[bytes]:
    publisher = FakePublisher()
    await _run_infer([encode_event(f"text {i}", id=f"p{i}") for i in range(n)], publisher)
    return [value for _, _, value, _ in sorted(publisher.on("preds"), key=lambda r: r[1] or b"")]


async def test_index_stage_indexes_dead_letters_rejects_and_acks_all() -> None:
    values = await _predictions(6)
    writer = FakeWriter(reject_labels=["neutral"])
    publisher = FakePublisher()
    metrics = Metrics()
    stage = IndexStage(writer, publisher, "preds.dlq", metrics)
    acks = Acks()
    records = [acks.record(i, value) for i, value in enumerate(values)]
    records.append(acks.record(99, b"garbage"))
    await stage.handle_batch(records)
    # FakeEngine labels "text i" neutral, so every prediction is rejected for good here.
    dead = publisher.on("preds.dlq")
    assert len(dead) == 7
    codes = sorted(parse_dead_letter_headers(h or [])["inflow.error.code"] for _, _, _, h in dead)
    assert codes == ["index_rejected"] * 6 + ["invalid_prediction"]
    assert {value for _, _, value, _ in dead} == {*values, b"garbage"}
    assert sorted(acks.offsets) == [0, 1, 2, 3, 4, 5, 99]
    assert metrics.total("inflow_documents_rejected_total") == 6
    assert metrics.total("inflow_documents_indexed_total") == 0
    assert metrics.total("inflow_dead_letters_total") == 7


async def test_index_stage_retries_until_the_index_accepts_then_acks() -> None:
    values = await _predictions(3)
    writer = FakeWriter(fail_first=2)
    stage = IndexStage(writer, FakePublisher(), "preds.dlq", Metrics())
    acks = Acks()
    await stage.handle_batch([acks.record(i, v) for i, v in enumerate(values)])
    assert writer.calls == 3 and sorted(writer.docs) == ["p0", "p1", "p2"]
    assert sorted(acks.offsets) == [0, 1, 2]


async def test_index_buffer_flushes_by_size_and_by_age() -> None:
    values = await _predictions(5)
    writer = FakeWriter()
    buffer = IndexBuffer(IndexStage(writer, FakePublisher(), "dlq", Metrics()), 3, 50)
    await buffer.start()
    acks = Acks()
    for i, value in enumerate(values):
        await buffer.add(acks.record(i, value))
    assert writer.calls == 1 and len(writer.docs) == 3  # the full batch of 3 went at once
    await asyncio.sleep(0.2)
    assert writer.calls == 2 and len(writer.docs) == 5  # the last 2 went when old enough
    await buffer.stop()
    assert sorted(acks.offsets) == [0, 1, 2, 3, 4]


async def test_a_replayed_record_keeps_its_replay_count_downstream() -> None:
    """`inflow dlq replay` marks a record with inflow.replay.count: its prediction carries the
    count on, and a dead letter it becomes again keeps it (so replay can refuse loops)."""
    replayed = [("inflow.replay.count", b"2")]
    publisher = FakePublisher()
    metrics = Metrics()
    batcher = Batcher(FakeEngine(fail_on="poison"), BatchPolicy(8, 10_000, 5))
    stage = InferStage(batcher, publisher, TOPICS, metrics, max_in_flight=16)
    await batcher.start()
    acks = Acks()
    for offset, text in enumerate(["fine", "poison"]):
        record = acks.record(offset, encode_event(text, id=text))
        await stage.handle(dataclasses.replace(record, headers=replayed))
    await stage.handle(acks.record(2, b"{bad"))  # never replayed: no count
    await stage.drain()
    await batcher.stop()
    [(_, _, value, headers)] = publisher.on("preds")
    assert headers == replayed
    dead = [parse_dead_letter_headers(h or []) for _, _, _, h in publisher.on("texts.dlq")]
    [poison] = [h for h in dead if h["inflow.error.code"] == "inference_failed"]
    assert poison["inflow.replay.count"] == "2"
    assert poison["inflow.engine.version"] == "v-test"
    [bad] = [h for h in dead if h["inflow.error.code"] == "invalid_json"]
    assert "inflow.replay.count" not in bad and "inflow.engine.version" not in bad

    index_publisher = FakePublisher()
    predicted = decode_prediction(value or b"")
    assert isinstance(predicted, Prediction) and predicted.label is not None
    writer = FakeWriter(reject_labels=[predicted.label])
    index = IndexStage(writer, index_publisher, "p.dlq", metrics)
    await index.handle_batch([dataclasses.replace(acks.record(5, value), headers=headers)])
    [(_, _, _, dead_headers)] = index_publisher.on("p.dlq")
    parsed = parse_dead_letter_headers(dead_headers or [])
    assert parsed["inflow.error.code"] == "index_rejected"
    assert parsed["inflow.replay.count"] == "2"
    assert parsed["inflow.engine.version"] == "v-test"
