"""Consumer lag per assigned partition, read from the broker, and when each partition last moved.

lag = log-end offset - the group's committed offset: the figure `kafka-consumer-groups
--describe` prints. Both offsets come from the broker through two small clients of our own (an
admin client for the group's committed offsets, a consumer without a group for the end offsets),
never from Faust's consumer, so a wedged Faust fetcher cannot also freeze the measurement that
should reveal it. The caller says which partitions are this worker's (its current assignment).

    lag = ConsumerLag("inflow", assignment=lambda: [("inflow.texts", 0)],
                      client_options={"bootstrap_servers": "127.0.0.1:9092"})
    async with lag:
        sample = await lag.sample()      # I/O; also kept as lag.last
    sample.lag                           # {("inflow.texts", 0): 42}
    sample.stalled(max_idle_s=60)        # lagging partitions that have not moved for 60 s

A partition "makes progress" when its committed offset increases or when it is caught up
(lag 0); one newly assigned starts with a grace period (its progress time is when it was first
seen). Times are `time.monotonic()` seconds unless another clock is given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # (topic, partition); aiokafka's and Faust's TP tuples are both this


class LagUnavailable(Exception):
    """The broker did not answer the offset requests in time (or refused them)."""


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int  # offset of the next record to be written
    position: int  # the group's committed offset; the log start when it has committed nothing
    lag: int  # end_offset - position, never negative
    progress_at: float  # last time position advanced or lag was 0 (or when first seen)
    idle_s: float  # seconds since progress_at when lagging, else 0


@dataclass(frozen=True, slots=True)
class LagSample:
    taken_at: float
    partitions: Mapping[Partition, PartitionLag]

    @property
    def lag(self) -> dict[Partition, int]:
        return {key: p.lag for key, p in self.partitions.items()}

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions.values())

    @property
    def last_progress(self) -> float | None:
        """Latest time any assigned partition advanced or was caught up (None: none assigned)."""
        return max((p.progress_at for p in self.partitions.values()), default=None)

    def stalled(self, max_idle_s: float) -> list[PartitionLag]:
        """Partitions with lag > 0 whose position has not advanced for more than `max_idle_s`."""
        return [p for p in self.partitions.values() if p.lag > 0 and p.idle_s > max_idle_s]


def merge_samples(samples: Iterable[LagSample | None]) -> LagSample | None:
    """One sample over several groups' partitions (an exactly-once worker consumes its texts
    in a group of its own): None until every group has been sampled once."""
    taken = list(samples)
    if not taken or any(sample is None for sample in taken):
        return None
    present = [sample for sample in taken if sample is not None]
    if len(present) == 1:
        return present[0]
    partitions: dict[Partition, PartitionLag] = {}
    for sample in present:
        partitions.update(sample.partitions)
    return LagSample(min(sample.taken_at for sample in present), partitions)


class LagTracker:
    """Pure bookkeeping: offsets in, a `LagSample` out, remembering each partition's progress."""

    def __init__(self) -> None:
        self._seen: dict[Partition, tuple[int, float]] = {}  # position, progress_at

    def update(
        self,
        now: float,
        end_offsets: Mapping[Partition, int],
        committed: Mapping[Partition, int | None],
        log_start: Mapping[Partition, int] | None = None,
    ) -> LagSample:
        """One sample for the partitions of `end_offsets`; others are forgotten.

        `committed[p]` is None (or missing) when the group has committed nothing there; the
        position is then `log_start[p]` (where an `earliest` consumer begins), else 0.
        """
        starts = log_start or {}
        partitions: dict[Partition, PartitionLag] = {}
        for key, end in end_offsets.items():
            offset = committed.get(key)
            position = offset if offset is not None and offset >= 0 else starts.get(key, 0)
            lag = max(0, end - position)
            previous = self._seen.get(key)
            if previous is None or lag == 0 or position > previous[0]:
                progress_at = now
            else:
                progress_at = previous[1]
            self._seen[key] = (position, progress_at)
            partitions[key] = PartitionLag(
                topic=key[0],
                partition=key[1],
                end_offset=end,
                position=position,
                lag=lag,
                progress_at=progress_at,
                idle_s=now - progress_at if lag > 0 else 0.0,
            )
        for gone in set(self._seen) - set(end_offsets):
            del self._seen[gone]
        return LagSample(now, partitions)


class ConsumerLag:
    """Samples the lag of `group_id` on the partitions `assignment()` names.

    `__init__` only stores; `start()` opens the two clients; `stop()` closes them (safe twice).
    `client_options` are aiokafka keyword arguments (bootstrap_servers, security options).
    """

    def __init__(
        self,
        group_id: str,
        assignment: Callable[[], Iterable[Partition]],
        client_options: Mapping[str, Any],
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.group_id = group_id
        self._assignment = assignment
        self._options = dict(client_options)
        self._timeout_s = timeout_s
        self._clock = clock
        self._tracker = LagTracker()
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._last: LagSample | None = None

    @property
    def last(self) -> LagSample | None:
        """The latest successful sample (None before the first)."""
        return self._last

    async def start(self) -> None:
        if self._admin is not None:
            return
        timeout_ms = int(self._timeout_s * 1000)
        admin = AIOKafkaAdminClient(**self._options, request_timeout_ms=timeout_ms)
        consumer = AIOKafkaConsumer(
            **self._options,
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=timeout_ms,
        )
        try:
            await admin.start()
            await consumer.start()
            # Let the consumer's background task begin: aiokafka 0.14's stop() re-raises the
            # CancelledError of a task cancelled before it ever ran.
            await asyncio.sleep(0)
        except BaseException:
            await consumer.stop()
            await admin.close()
            raise
        self._admin, self._consumer = admin, consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        admin, self._admin = self._admin, None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def sample(self) -> LagSample:
        """Ask the broker for the offsets of the assigned partitions; raises `LagUnavailable`
        when the assignment is unknown or the broker does not answer within `timeout_s`."""
        if self._admin is None or self._consumer is None:
            raise RuntimeError("ConsumerLag.sample() before start()")
        try:
            assigned = {TopicPartition(topic, partition) for topic, partition in self._assignment()}
        except Exception as exc:  # e.g. Faust's ConsumerNotStarted while the worker starts
            raise LagUnavailable(f"assignment unknown: {exc!r}") from exc
        tps = sorted(assigned)
        try:
            ends, committed, starts = await asyncio.wait_for(
                self._offsets(self._admin, self._consumer, tps), self._timeout_s
            )
        except (KafkaError, TimeoutError, OSError) as exc:
            raise LagUnavailable(f"offsets of group {self.group_id}: {exc!r}") from exc
        sample = self._tracker.update(self._clock(), ends, committed, starts)
        self._last = sample
        return sample

    async def _offsets(
        self, admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> tuple[dict[Partition, int], dict[Partition, int | None], dict[Partition, int]]:
        if not tps:
            return {}, {}, {}
        found = await admin.list_consumer_group_offsets(self.group_id, partitions=tps)
        committed: dict[Partition, int | None] = {
            (tp.topic, tp.partition): (meta.offset if meta.offset >= 0 else None)
            for tp, meta in found.items()
        }
        ends = await consumer.end_offsets(tps)
        uncommitted = [tp for tp in tps if committed.get((tp.topic, tp.partition)) is None]
        starts = await consumer.beginning_offsets(uncommitted) if uncommitted else {}
        return (
            {(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()},
            committed,
            {(tp.topic, tp.partition): int(offset) for tp, offset in starts.items()},
        )
