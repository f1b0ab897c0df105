"""The broker the suite runs on: partitions, consumer groups and committed offsets work."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = pytest.mark.integration


async def _consume(
    bootstrap: str, topic: str, group: str, expected: int, commit_after: int | None = None
) -> list[tuple[int, int, bytes]]:
    """Consume up to `expected` records; commit the offsets of the first `commit_after`."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    seen: list[tuple[int, int, bytes]] = []
    try:
        while len(seen) < expected:
            batch = await consumer.getmany(timeout_ms=5000, max_records=expected - len(seen))
            if not batch:
                break
            for records in batch.values():
                for record in records:
                    assert record.value is not None
                    seen.append((record.partition, record.offset, record.value))
                    if commit_after is not None and len(seen) <= commit_after:
                        tp = TopicPartition(topic, record.partition)
                        await consumer.commit({tp: record.offset + 1})
    finally:
        await consumer.stop()
    return seen


async def test_keyed_partitions_group_commit_and_resume(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("events"), unique_name("group")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
        described = await admin.describe_topics([topic])
        assert len(described[0]["partitions"]) == 4
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for i in range(200):
            await producer.send(topic, key=f"id-{i % 20}".encode(), value=f"v{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    first = await _consume(kafka_bootstrap, topic, group, expected=200, commit_after=120)
    assert len(first) == 200
    assert len({partition for partition, _, _ in first}) == 4, "keys should spread over 4 parts"
    # One key always lands on one partition: the order per key is kept.
    by_key: dict[bytes, set[int]] = {}
    for partition, _, value in first:
        by_key.setdefault(f"id-{int(value[1:]) % 20}".encode(), set()).add(partition)
    assert all(len(parts) == 1 for parts in by_key.values())

    # A new consumer of the same group resumes after the committed offsets: 80 remain.
    rest = await _consume(kafka_bootstrap, topic, group, expected=200)
    committed_values = {value for _, _, value in first[:120]}
    assert len(rest) == 80
    assert not committed_values & {value for _, _, value in rest}
    assert committed_values | {value for _, _, value in rest} == {v for _, _, v in first}
