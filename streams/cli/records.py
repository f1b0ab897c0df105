"""Read a topic's records once, from a time or from offsets up to the end seen at the start.

For operator commands that look back over a topic (`inflow dlq`): no consumer group, nothing
committed. The end is a snapshot taken first, so records produced while reading (a replay's own
dead letters, live traffic) do not keep the read going.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streams.config import Settings
from streams.errors import KafkaUnavailable
from streams.kafka import admin_client, client_options

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    @property
    def position(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


async def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partition numbers of `topic`; empty when it does not exist."""
    admin = admin_client(settings)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described.get("error_code", 0) != 0:
        return []
    return sorted(int(p["partition"]) for p in described["partitions"])


async def read_records(
    settings: Settings,
    topic: str,
    *,
    since_ms: int | None = None,
    start_offsets: Mapping[int, int] | None = None,
    poll_ms: int = 500,
) -> AsyncIterator[Record]:
    """Every record of `topic` from `since_ms` (Kafka timestamps), or from `start_offsets`
    (partition -> offset; partitions not named start at the beginning), or from the
    beginning, up to each partition's end offset at the start of the call."""
    partitions = await topic_partitions(settings, topic)
    if not partitions:
        return
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        if since_ms is not None:
            found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                starts[tp] = hit.offset if hit is not None else ends[tp]
        for tp in tps:
            if start_offsets is not None and tp.partition in start_offsets:
                starts[tp] = max(starts[tp], start_offsets[tp.partition])
            consumer.seek(tp, starts[tp])
        open_tps = {tp for tp in tps if starts[tp] < ends[tp]}
        for tp in set(tps) - open_tps:
            consumer.pause(tp)
        while open_tps:
            batch = await consumer.getmany(*open_tps, timeout_ms=poll_ms)
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset >= ends[tp]:
                        break
                    yield Record(
                        m.topic,
                        m.partition,
                        m.offset,
                        m.timestamp,
                        m.key,
                        m.value,
                        [(name, bytes(value or b"")) for name, value in (m.headers or ())],
                    )
            for tp in list(open_tps):
                if await consumer.position(tp) >= ends[tp]:
                    open_tps.discard(tp)
                    consumer.pause(tp)
    except KafkaError as exc:
        raise KafkaUnavailable(f"reading {topic}: {type(exc).__name__}: {exc}") from exc
    finally:
        await consumer.stop()
