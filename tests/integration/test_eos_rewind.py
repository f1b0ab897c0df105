"""rewind_to_committed (streams.delivery.eos) against the real broker: a batch that was not
committed is fetched again from the group's committed offset, and a rebalance during the rewind
is no error.

The second case is the one a CI run hit: the exactly-once loop rewound a partition, a
rebalance took the partition away while the rewind asked the broker for the committed offset,
and the seek that followed raised (aiokafka refuses to seek an unassigned partition), which
ended the loop and stopped the worker's consumption for good.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.delivery.eos import rewind_to_committed
from tests.integration.kafka_topics import create_topic

pytestmark = pytest.mark.integration


async def _partition_of(bootstrap: str, topic: str, records: int) -> TopicPartition:
    """A new one-partition topic holding `records` records."""
    await create_topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(records):
            await producer.send(topic, value=f"v{i}".encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    return TopicPartition(topic, 0)


@pytest.fixture
async def consumer(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> AsyncIterator[tuple[AIOKafkaConsumer, TopicPartition]]:
    """A consumer of a 10-record partition at position 10, with offset 4 committed."""
    tp = await _partition_of(kafka_bootstrap, unique_name("rewind"), 10)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=unique_name("group"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: 4})
        consumer.seek(tp, 10)
        yield consumer, tp
    finally:
        await consumer.stop()


async def test_rewind_goes_back_to_the_committed_offset(
    consumer: tuple[AIOKafkaConsumer, TopicPartition],
) -> None:
    kafka, tp = consumer
    await rewind_to_committed(kafka, tp)
    assert await kafka.position(tp) == 4
    batch = await kafka.getmany(tp, timeout_ms=10_000)
    assert [m.value for m in batch[tp]][:1] == [b"v4"], "the uncommitted records come again"


async def test_a_partition_revoked_while_the_rewind_asks_the_broker_is_left_alone(
    consumer: tuple[AIOKafkaConsumer, TopicPartition],
) -> None:
    kafka, tp = consumer
    ask_broker = kafka.committed

    async def committed_then_revoked(partition: TopicPartition) -> int | None:
        offset = await ask_broker(partition)
        kafka.unsubscribe()  # what a rebalance does to this consumer meanwhile
        return offset

    kafka.committed = committed_then_revoked  # type: ignore[method-assign]
    await rewind_to_committed(kafka, tp)  # raised IllegalStateError/AssertionError before
    assert kafka.assignment() == set()


async def test_nothing_committed_rewinds_to_the_log_start(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    tp = await _partition_of(kafka_bootstrap, unique_name("rewind"), 3)
    kafka = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=unique_name("group"), enable_auto_commit=False
    )
    await kafka.start()
    try:
        kafka.assign([tp])
        kafka.seek(tp, 3)
        await rewind_to_committed(kafka, tp)
        assert await kafka.position(tp) == 0
    finally:
        await kafka.stop()
