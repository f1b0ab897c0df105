"""/health/live's verdict on a genuine broker: a consumer group member that holds its partition
but stops committing while records keep arriving is stalled; committing again makes it live.

The worker wires the same `ConsumerLag` + `WorkerHealth` pair (streams/app.py); here a plain
group member shows the verdict step by step (within the limit, stalled, caught up). A stalled
worker process is tested in tests/e2e/test_health.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.ops.health import WorkerHealth
from streams.ops.lag import ConsumerLag
from tests.integration.kafka_topics import create_topic

pytestmark = pytest.mark.integration


async def test_a_member_that_stops_committing_with_lag_is_not_live(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("texts"), unique_name("group")
    await create_topic(kafka_bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    member = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await member.start()
    lag = ConsumerLag(
        group,
        assignment=lambda: [(tp.topic, tp.partition) for tp in member.assignment()],
        client_options={"bootstrap_servers": kafka_bootstrap},
    )
    health = WorkerHealth(assignment=member.assignment, lag=lambda: lag.last, stall_after_s=1.0)
    for name in ("engine", "elasticsearch", "agents"):
        health.set(name, None)
    tp = TopicPartition(topic, 0)
    try:
        await lag.start()
        for i in range(10):
            await producer.send_and_wait(topic, f"event-{i}".encode())
        taken: list[object] = []
        while len(taken) < 4:  # a fetch may return fewer records than asked for
            batch = await member.getmany(tp, timeout_ms=10_000, max_records=4 - len(taken))
            assert batch, "no records within 10 s"
            taken += batch.get(tp, [])
        await member.commit({tp: 4})  # took 4 of 10, then stops: lag 6
        assert health.ready().ok, "the member holds its partition"
        sample = await lag.sample()
        assert sample.lag == {(topic, 0): 6}
        assert health.live().ok, "not stalled yet: the limit has not passed"
        await asyncio.sleep(1.5)
        await producer.send_and_wait(topic, b"event-10")  # records keep arriving
        await lag.sample()
        report = health.live()
        assert not report.ok and report.status == 503
        assert f"{topic}[0] lag 7" in report.checks["consumer"], report.checks

        await member.commit({tp: 11})  # the member catches up
        await lag.sample()
        assert health.live().ok
    finally:
        await lag.stop()
        await member.stop()
        await producer.stop()
