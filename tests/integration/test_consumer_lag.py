"""ConsumerLag against the real broker: lag from the group's committed offsets, per partition."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from streams.ops.lag import ConsumerLag, LagUnavailable
from tests.integration.kafka_topics import commit_offsets, create_topic

pytestmark = pytest.mark.integration


async def test_lag_is_end_offset_minus_committed_offset_per_assigned_partition(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("lag"), unique_name("group")
    await create_topic(kafka_bootstrap, topic, partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for partition, count in ((0, 10), (1, 4)):  # partition 2 stays empty
            for i in range(count):
                await producer.send(topic, value=f"v{i}".encode(), partition=partition)
        await producer.flush()
    finally:
        await producer.stop()

    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    await commit_offsets(kafka_bootstrap, group, {tp0: 6})  # partition 1: nothing committed
    assigned = [(topic, 0), (topic, 1), (topic, 2)]
    lag = ConsumerLag(group, lambda: assigned, {"bootstrap_servers": kafka_bootstrap})
    async with lag:
        first = await lag.sample()
        assert first.lag == {(topic, 0): 4, (topic, 1): 4, (topic, 2): 0}
        assert first.partitions[(topic, 0)].end_offset == 10
        assert first.partitions[(topic, 1)].position == 0  # the log start: `earliest`

        await commit_offsets(kafka_bootstrap, group, {tp0: 10, tp1: 1})
        assigned.remove((topic, 2))  # a rebalance took it away
        second = await lag.sample()
        assert second.lag == {(topic, 0): 0, (topic, 1): 3}
        assert second.partitions[(topic, 1)].progress_at == second.taken_at  # it advanced
        assert lag.last is second


async def test_an_unknown_assignment_is_reported_not_raised_through(
    kafka_bootstrap: str,
) -> None:
    def not_started() -> list[tuple[str, int]]:
        raise RuntimeError("consumer not started")

    async with ConsumerLag("g", not_started, {"bootstrap_servers": kafka_bootstrap}) as lag:
        with pytest.raises(LagUnavailable, match="assignment unknown"):
            await lag.sample()
        assert lag.last is None
