"""ConsumerLag behind transactional writers, on the real broker: the commit and abort markers
that Kafka transactions leave, and aborted records, are not lag; real records still are.

An exactly-once worker writes its predictions in transactions; the index agent's group commits
last data + 1, one short of the log end. Here an aiokafka transactional producer writes the
records and a plain group commits where such a consumer would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from streams.ops.lag import ConsumerLag
from tests.integration.kafka_topics import commit_offsets, create_topic

pytestmark = pytest.mark.integration


async def _transaction(
    producer: AIOKafkaProducer, topic: str, counts: dict[int, int], *, commit: bool = True
) -> dict[int, list[int]]:
    """One transaction of `counts[p]` records to each partition p; the data offsets it wrote."""
    await producer.begin_transaction()
    sent: dict[int, list[Any]] = {p: [] for p in counts}
    for partition, count in counts.items():
        for i in range(count):
            sent[partition].append(
                await producer.send(topic, f"r{i}".encode(), partition=partition)
            )
    offsets = {p: [(await future).offset for future in futures] for p, futures in sent.items()}
    if commit:
        await producer.commit_transaction()
    else:
        await producer.abort_transaction()
    return offsets


def _lag(group: str, topic: str, partitions: int, bootstrap: str, **extra: Any) -> ConsumerLag:
    assigned = [(topic, p) for p in range(partitions)]
    return ConsumerLag(group, lambda: assigned, {"bootstrap_servers": bootstrap}, **extra)


async def test_committed_transactions_leave_no_lag_once_the_group_passed_their_data(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("preds"), unique_name("group")
    await create_topic(kafka_bootstrap, topic, partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=topic)
    await producer.start()
    try:
        written: dict[int, list[int]] = {0: [], 1: []}
        for _ in range(3):
            for p, offsets in (await _transaction(producer, topic, {0: 2, 1: 1})).items():
                written[p] += offsets
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        # Partition 0: consumed to the end (last data + 1, the marker's offset). Partition 1:
        # only its first transaction; two records of real data remain.
        await commit_offsets(
            kafka_bootstrap, group, {tp0: written[0][-1] + 1, tp1: written[1][0] + 1}
        )
        async with _lag(group, topic, 2, kafka_bootstrap) as lag:
            first = await lag.sample()
            p0, p1 = first.partitions[(topic, 0)], first.partitions[(topic, 1)]
            assert p0.end_offset == written[0][-1] + 2, "one marker past the last record"
            assert (p0.lag, p0.markers) == (0, 1), p0
            assert p1.lag == p1.end_offset - p1.position > 0 and p1.markers == 0, p1

            # Idle: the answers are remembered, not probed again at every sample.
            assert lag._prober is not None
            fetches = 0
            getmany = lag._prober.getmany

            async def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal fetches
                fetches += 1
                return await getmany(*args, **kwargs)

            lag._prober.getmany = counted  # type: ignore[method-assign]
            await asyncio.sleep(0.2)
            idle = await lag.sample()
            assert idle.lag == {(topic, 0): 0, (topic, 1): p1.lag}
            assert fetches == 0, "nothing moved: no probe"
            assert [p.partition for p in idle.stalled(0.1)] == [1], "real lag still stalls"

            # New data past the marker: the group is behind again, by real records.
            more = await _transaction(producer, topic, {0: 2})
            # The coordinator writes the commit marker after the producer's commit returns:
            # sample until it is there (end offset = last record + 2).
            deadline = time.monotonic() + 10
            while True:
                behind = await lag.sample()
                if behind.partitions[(topic, 0)].end_offset == more[0][-1] + 2:
                    break
                assert time.monotonic() < deadline, behind.partitions[(topic, 0)]
                await asyncio.sleep(0.05)
            assert behind.partitions[(topic, 0)].lag == 4 and fetches > 0  # 1 marker + 2 + 1

            await commit_offsets(kafka_bootstrap, group, {tp0: more[0][-1] + 1})
            moved = await lag.sample()  # it moved: progress, no probe needed this time
            assert moved.partitions[(topic, 0)].lag in (0, 1)
            settled = await lag.sample()
            assert settled.partitions[(topic, 0)].lag == 0
            assert settled.partitions[(topic, 0)].markers == 1
    finally:
        await producer.stop()


async def test_aborted_records_are_not_lag_once_the_group_passed_the_data_before_them(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic, group, early = unique_name("preds"), unique_name("group"), unique_name("early")
    await create_topic(kafka_bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=topic)
    await producer.start()
    tp = TopicPartition(topic, 0)
    try:
        kept = (await _transaction(producer, topic, {0: 2}))[0]  # 0, 1, marker 2
        aborted = (await _transaction(producer, topic, {0: 3}, commit=False))[0]  # 3-5, marker 6
        assert aborted[0] > kept[-1] + 1
        # A read_committed consumer commits after the last record it received: the kept one.
        await commit_offsets(kafka_bootstrap, group, {tp: kept[-1] + 1})
        await commit_offsets(
            kafka_bootstrap, early, {tp: kept[0] + 1}
        )  # one kept record not consumed
        async with _lag(group, topic, 1, kafka_bootstrap) as lag:
            sample = (await lag.sample()).partitions[(topic, 0)]
            assert sample.end_offset == aborted[-1] + 2
            assert (sample.lag, sample.markers) == (0, 1 + len(aborted) + 1), sample

            # Committed data after the aborted transaction is real lag again.
            after = (await _transaction(producer, topic, {0: 1}))[0]
            assert (await lag.sample()).partitions[(topic, 0)].lag == after[0] + 2 - (kept[-1] + 1)
            await commit_offsets(kafka_bootstrap, group, {tp: after[-1] + 1})
            await lag.sample()  # moved
            assert (await lag.sample()).lag == {(topic, 0): 0}
        async with _lag(early, topic, 1, kafka_bootstrap) as lag:
            sample = (await lag.sample()).partitions[(topic, 0)]
            assert sample.lag == sample.end_offset - (kept[0] + 1) and sample.markers == 0
    finally:
        await producer.stop()


async def test_an_open_transaction_is_lag_until_it_ends(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    # read_committed stops at the last stable offset, below an open transaction's records:
    # the probe cannot decide, and an undecided gap counts as lag (never excused on a guess).
    topic, group = unique_name("preds"), unique_name("group")
    await create_topic(kafka_bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=topic)
    await producer.start()
    tp = TopicPartition(topic, 0)
    try:
        kept = (await _transaction(producer, topic, {0: 1}))[0]
        await commit_offsets(kafka_bootstrap, group, {tp: kept[-1] + 1})
        await producer.begin_transaction()
        pending = await (await producer.send(topic, b"open", partition=0))
        async with _lag(group, topic, 1, kafka_bootstrap, probe_timeout_s=0.5) as lag:
            sample = (await lag.sample()).partitions[(topic, 0)]
            assert sample.end_offset == pending.offset + 1
            assert (sample.lag, sample.markers) == (2, 0), sample  # the marker + the open record
            await producer.commit_transaction()
            await commit_offsets(kafka_bootstrap, group, {tp: pending.offset + 1})
            await lag.sample()  # moved
            assert (await lag.sample()).lag == {(topic, 0): 0}
    finally:
        await producer.stop()
