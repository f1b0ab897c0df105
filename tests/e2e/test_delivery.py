"""Nothing lost at the limits, on genuine Kafka: outputs too large for their topic, a stop while
a record is parked, a kill -9 at a random moment, a dead-letter topic that refuses records.

Each input must end as exactly one prediction or exactly one dead letter. Under at least once,
a kill -9 may publish a prediction or a dead letter a second time (the records since the last
commit are processed again); an input is never missing, and never both predicted and
dead-lettered. Exactly once, read_committed, each ends exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import decode_prediction, encode_event, parse_dead_letter_headers
from streams.delivery.records import DEFAULT_MAX_MESSAGE_BYTES
from tests.chaos.harness import alter_topic, read_all
from tests.e2e.conftest import Names, Worker, WorkerFactory

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

Record = tuple[bytes | None, bytes | None]


def sized_event(event_id: str, size: int) -> bytes:
    """A short review whose metadata pads the encoded event to exactly `size` bytes."""
    base = len(encode_event("Short review: works as described.", id=event_id, metadata={"pad": ""}))
    value = encode_event(
        "Short review: works as described.", id=event_id, metadata={"pad": "x" * (size - base)}
    )
    assert len(value) == size
    return value


def normal(event_id: str) -> Record:
    return event_id.encode(), encode_event(
        f"a normal event {event_id}, quite pleasant", id=event_id
    )


async def produce(bootstrap: str, topic: str, records: list[Record]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        for key, value in records:  # one at a time: one partition, in this order
            await (await producer.send("" + topic, key=key, value=value, partition=0))
    finally:
        await producer.stop()


async def create_topics(bootstrap: str, names: Names, configs: dict[str, dict[str, str]]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, 1, 1, topic_configs=configs.get(name, {}))
                for name in (names.texts, names.predictions, names.texts_dlq, names.predictions_dlq)
            ]
        )
    finally:
        await admin.close()


async def committed(bootstrap: str, group: str, topic: str) -> int | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    meta = offsets.get(TopicPartition(topic, 0))
    return None if meta is None or meta.offset < 0 else meta.offset


async def end_offset(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def outcomes(
    bootstrap: str, names: Names, ids: set[str], *, read_committed: bool, timeout_s: float = 180
) -> tuple[dict[str, int], dict[str, list[dict[str, bytes]]]]:
    """Predictions per id and dead letters per id (their headers), once every id has one."""
    deadline = time.monotonic() + timeout_s
    while True:
        predictions: dict[str, int] = {}
        for _key, value, _ in await read_all(
            bootstrap, names.predictions, read_committed=read_committed
        ):
            prediction = decode_prediction(value or b"")
            assert not hasattr(prediction, "code"), prediction
            predictions[prediction.id] = predictions.get(prediction.id, 0) + 1  # type: ignore[union-attr]
        dead: dict[str, list[dict[str, bytes]]] = {}
        for key, _value, headers in await read_all(
            bootstrap, names.texts_dlq, read_committed=read_committed
        ):
            dead.setdefault((key or b"").decode(), []).append(headers)
        if ids <= set(predictions) | set(dead) or time.monotonic() > deadline:
            return predictions, dead
        await asyncio.sleep(1)


def assert_each_ends_once(
    ids: set[str],
    predictions: dict[str, int],
    dead: dict[str, list[dict[str, bytes]]],
    *,
    exactly: bool,
) -> None:
    missing = ids - set(predictions) - set(dead)
    assert not missing, f"lost: {sorted(missing)}"
    both = set(predictions) & set(dead)
    assert not both, f"predicted and dead-lettered: {sorted(both)}"
    if exactly:  # at least once, a kill may publish a prediction or a dead letter twice
        assert all(n == 1 for n in predictions.values()), predictions
        assert all(len(letters) == 1 for letters in dead.values()), dead


async def test_a_prediction_over_its_topics_limit_is_one_dead_letter_and_stop_is_bounded(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str
) -> None:
    """The lost event of the issue: between normal events on one partition, an input the texts
    topic takes whose prediction is over the predictions topic's limit (Kafka's defaults)."""
    await create_topics(kafka_bootstrap, names, {})
    whole = sized_event("big-whole", 1_045_000)  # its dead letter fits the texts DLQ whole
    # At the texts topic's limit: its dead letter (the original plus headers) does not fit.
    at_limit = sized_event("big-at-limit", DEFAULT_MAX_MESSAGE_BYTES - 200)
    records = [
        normal("n-0"),
        (b"big-whole", whole),
        *[normal(f"n-{i}") for i in range(1, 31)],
        (b"big-at-limit", at_limit),
        normal("n-31"),
    ]
    await produce(kafka_bootstrap, names.texts, records)
    worker = workers.start(INFLOW_TOPIC_PARTITIONS="1", INFLOW_DRAIN_TIMEOUT_S="5")
    ids = {(key or b"").decode() for key, _ in records}
    predictions, dead = await outcomes(kafka_bootstrap, names, ids, read_committed=False)
    assert_each_ends_once(ids, predictions, dead, exactly=True)
    assert set(dead) == {"big-whole", "big-at-limit"}
    for headers in (dead["big-whole"][0], dead["big-at-limit"][0]):
        parsed = parse_dead_letter_headers(headers)
        assert parsed["inflow.error.code"] == "prediction_too_large", parsed
        assert parsed["inflow.error.stage"] == "publish"
    assert "inflow.dlq.truncated" not in dead["big-whole"][0]
    truncated = parse_dead_letter_headers(dead["big-at-limit"][0])
    assert truncated["inflow.dlq.truncated"] == "true"
    assert truncated["inflow.original.size"] == str(len(at_limit))
    assert truncated["inflow.original.sha256"] == hashlib.sha256(at_limit).hexdigest()
    by_key = {key: value for key, value, _ in await read_all(kafka_bootstrap, names.texts_dlq)}
    assert by_key[b"big-whole"] == whole, "a dead letter keeps the original bytes"
    kept = by_key[b"big-at-limit"] or b""
    assert 0 < len(kept) < len(at_limit) and at_limit.startswith(kept), "a prefix of them"

    # Everything answered: the group commits to the end of the partition, over no record.
    end = await end_offset(kafka_bootstrap, names.texts)
    deadline = time.monotonic() + 30
    while await committed(kafka_bootstrap, names.app_id, names.texts) != end:
        assert time.monotonic() < deadline, "the answered prefix was never committed"
        await asyncio.sleep(0.5)
    started = time.monotonic()
    assert await asyncio.to_thread(worker.stop, signal.SIGTERM, 40) == 0
    assert time.monotonic() - started < 5 + 20, "SIGTERM took longer than the drain bound"


async def _refusing_dlq(
    workers: WorkerFactory, names: Names, bootstrap: str, guarantee: str
) -> tuple[Worker, list[Record]]:
    """A texts dead-letter topic that refuses the dead letters of keyless records (compacted:
    a record without a key is invalid there): a permanent error of the system, not of one
    record. Between normal events, three keyless poison records."""
    await create_topics(bootstrap, names, {names.texts_dlq: {"cleanup.policy": "compact"}})
    records: list[Record] = [normal(f"n-{i}") for i in range(5)]
    records += [(None, b"{not json"), normal("n-5"), (None, b"[1]"), (None, b"")]
    records += [normal(f"n-{i}") for i in range(6, 12)]
    await produce(bootstrap, names.texts, records)
    worker = workers.start(
        wait_ready=False,
        INFLOW_TOPIC_PARTITIONS="1",
        INFLOW_PROCESSING_GUARANTEE=guarantee,
        INFLOW_PERMANENT_RECHECK_S="2",
        INFLOW_STALL_AFTER_S="4",
        INFLOW_HEALTH_POLL_S="1",
        INFLOW_DRAIN_TIMEOUT_S="3",
    )
    return worker, records


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_topic_that_refuses_is_not_ready_commits_nothing_past_it_then_recovers(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, guarantee: str
) -> None:
    worker, records = await _refusing_dlq(workers, names, kafka_bootstrap, guarantee)
    group = names.app_id if guarantee == "at_least_once" else f"{names.app_id}.eos"
    deadline = time.monotonic() + 120
    while True:
        answer = await asyncio.to_thread(worker.probe, "/health/ready")
        checks = answer[1]["checks"] if answer is not None else {}
        if answer is not None and answer[0] == 503 and checks.get("kafka", "ok") != "ok":  # type: ignore[union-attr]
            # the publish names the refusing topic; a transaction, the input partition
            assert ("texts.dlq" if guarantee == "at_least_once" else ".texts[0]") in str(
                checks["kafka"]  # type: ignore[index]
            )
            break
        assert time.monotonic() < deadline, f"never not-ready for the refusing topic: {answer}"
        await asyncio.sleep(0.5)
    live = await asyncio.to_thread(worker.probe, "/health/live")
    assert live is not None and live[0] == 200, "a restart would not fix it: readiness says why"
    await asyncio.sleep(3)  # commits run every second: none may pass the first poison record
    first_poison = next(i for i, (key, _) in enumerate(records) if key is None)
    position = await committed(kafka_bootstrap, group, names.texts)
    assert position is None or position <= first_poison, (position, first_poison)
    # The first worker is stopped while records are parked: within its drain bound, and what
    # is unanswered is not committed.
    started = time.monotonic()
    assert await asyncio.to_thread(worker.stop, signal.SIGTERM, 40) == 0
    assert time.monotonic() - started < 3 + 20
    position = await committed(kafka_bootstrap, group, names.texts)
    assert position is None or position <= first_poison, (position, first_poison)

    # The cause fixed, a new worker answers every record: each ends exactly once.
    await alter_topic(kafka_bootstrap, names.texts_dlq, {"cleanup.policy": "delete"})
    workers.start(INFLOW_TOPIC_PARTITIONS="1", INFLOW_PROCESSING_GUARANTEE=guarantee)
    ids = {(key or b"").decode() for key, _ in records if key is not None}
    exactly = guarantee == "exactly_once"
    predictions, dead = await outcomes(kafka_bootstrap, names, ids, read_committed=exactly)
    assert_each_ends_once(ids, predictions, {k: v for k, v in dead.items() if k}, exactly=exactly)
    assert len(dead.get("", [])) == 3 if exactly else len(dead.get("", [])) >= 3
    assert " ERROR " in worker.log.read_text(), "the refusal was one ERROR line"


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_kill_9_at_a_random_moment_loses_nothing(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, guarantee: str
) -> None:
    """Normal events, poison records and outputs too large, one partition; the worker is killed
    at a random moment of its run, then a new one takes over. Each input ends once."""
    await create_topics(kafka_bootstrap, names, {})
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    records: list[Record] = []
    for i in range(300):
        kind = rng.random()
        event_id = f"e-{i}"
        if kind < 0.05:
            records.append((event_id.encode(), b'{"text": "unterminated'))  # poison
        elif kind < 0.08:
            records.append((event_id.encode(), sized_event(event_id, 1_045_000)))  # too large
        else:
            records.append(normal(event_id))
    await produce(kafka_bootstrap, names.texts, records)
    env = {"INFLOW_TOPIC_PARTITIONS": "1", "INFLOW_PROCESSING_GUARANTEE": guarantee}
    first = workers.start(**env)
    await asyncio.sleep(rng.uniform(0.0, 4.0))
    first.stop(signal.SIGKILL)
    workers.start(**env)
    ids = {(key or b"").decode() for key, _ in records}
    exactly = guarantee == "exactly_once"
    predictions, dead = await outcomes(kafka_bootstrap, names, ids, read_committed=exactly)
    print(f"seed {seed}: {len(predictions)} predicted, {len(dead)} dead letters")
    assert_each_ends_once(ids, predictions, dead, exactly=exactly)
    poison = {(k or b"").decode() for k, v in records if v == b'{"text": "unterminated'}
    assert {
        i
        for i in dead
        if parse_dead_letter_headers(dead[i][0])["inflow.error.code"] == "invalid_json"
    } == poison, "nothing dead-lettered that should have been predicted"
