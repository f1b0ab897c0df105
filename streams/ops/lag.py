"""Consumer lag per assigned partition, read from the broker, and when each partition last moved.

lag = log-end offset - the group's committed offset: the figure `kafka-consumer-groups
--describe` prints, except that records a consumer never receives do not count. Both offsets
come from the broker through small clients of our own (an admin client for the group's committed
offsets, a consumer without a group for the end offsets), never from Faust's consumer, so a
wedged Faust fetcher cannot also freeze the measurement that should reveal it. The caller says
which partitions are this worker's (its current assignment).

    lag = ConsumerLag("inflow", assignment=lambda: [("inflow.texts", 0)],
                      client_options={"bootstrap_servers": "127.0.0.1:9092"})
    async with lag:
        sample = await lag.sample()      # I/O; also kept as lag.last
    sample.lag                           # {("inflow.texts", 0): 42}
    sample.stalled(max_idle_s=60)        # lagging partitions that have not moved for 60 s

Transaction markers. Each Kafka transaction leaves a commit or abort marker in every partition
it wrote, so behind an exactly-once writer the log end runs one past the last data record, and
a group that consumed everything commits last data + 1 and never reaches the end. A lagging
partition whose committed offset stood still since the last sample (or is new) is therefore
probed once: a third, `read_committed` consumer without a group seeks to the committed offset
and fetches. If no record below the log end comes back and its position reaches the log end
(read_committed skips markers and aborted data), the gap is markers only: lag 0, caught up
(`PartitionLag.markers` keeps the count). The answer is remembered per (partition, committed,
end), so an idle worker probes once, not at every sample. A probe that cannot decide (an open
transaction holds the last stable offset below the end, the broker is slow) leaves the lag as
it is: a stall is never excused on a guess.

A partition "makes progress" when its committed offset increases or when it is caught up
(lag 0); one newly assigned starts with a grace period (its progress time is when it was first
seen). Times are `time.monotonic()` seconds unless another clock is given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # (topic, partition); aiokafka's and Faust's TP tuples are both this
Gap = tuple[int, int]  # (position, end_offset): the records a group has not committed yet


class LagUnavailable(Exception):
    """The broker did not answer the offset requests in time (or refused them)."""


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int  # offset of the next record to be written
    position: int  # the group's committed offset; the log start when it has committed nothing
    lag: int  # end_offset - position (never negative), or 0 when those are `markers`
    progress_at: float  # last time position advanced or lag was 0 (or when first seen)
    idle_s: float  # seconds since progress_at when lagging, else 0
    markers: int = 0  # end_offset - position when a probe found only markers / aborted data


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


DRAIN_WINDOW_S = 60.0


class DrainRate:
    """Records this worker drained per second while it had work, over the last `window_s`.

    Fed every lag sample: between two samples, the committed positions' advance on the
    partitions that had lag at the first one is work done at full speed (a caught-up
    partition only shows the arrival rate, so it is left out). Backlog seconds are lag
    divided by this rate: 10,000 short tweets and 10,000 long reviews differ here, not in lag.
    """

    def __init__(self, window_s: float = DRAIN_WINDOW_S) -> None:
        self._window_s = window_s
        self._previous: LagSample | None = None
        self._busy: deque[tuple[float, float, int]] = deque()  # (taken_at, seconds, drained)

    def observe(self, sample: LagSample | None) -> None:
        if sample is None or (self._previous and sample.taken_at <= self._previous.taken_at):
            return
        previous, self._previous = self._previous, sample
        if previous is None:
            return
        busy = [
            key for key, p in previous.partitions.items() if p.lag > 0 and key in sample.partitions
        ]
        if busy:
            drained = sum(
                max(0, sample.partitions[k].position - previous.partitions[k].position)
                for k in busy
            )
            self._busy.append((sample.taken_at, sample.taken_at - previous.taken_at, drained))
        while self._busy and self._busy[0][0] < sample.taken_at - self._window_s:
            self._busy.popleft()

    def per_second(self) -> float | None:
        """None until a busy interval drained something (just started, or stalled)."""
        seconds = sum(s for _, s, _ in self._busy)
        drained = sum(n for _, _, n in self._busy)
        return drained / seconds if seconds > 0 and drained > 0 else None


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


@dataclass(frozen=True, slots=True)
class _Probed:
    """What a probe found between `position` and `end` of one partition."""

    position: int
    end: int
    markers_only: bool


class LagTracker:
    """Pure bookkeeping: offsets in, a `LagSample` out, remembering each partition's progress
    and what probes found in its uncommitted records.

    Per sample: `to_probe(...)` names the gaps worth a probe, `record_probe(...)` keeps each
    answer, then `update(...)` (with the same offsets) counts markers-only gaps as caught up.
    """

    def __init__(self) -> None:
        self._seen: dict[Partition, tuple[int, float]] = {}  # position, progress_at
        self._probed: dict[Partition, _Probed] = {}

    @staticmethod
    def _positions(
        end_offsets: Mapping[Partition, int],
        committed: Mapping[Partition, int | None],
        log_start: Mapping[Partition, int] | None,
    ) -> dict[Partition, int]:
        starts = log_start or {}
        positions: dict[Partition, int] = {}
        for key in end_offsets:
            offset = committed.get(key)
            positions[key] = offset if offset is not None and offset >= 0 else starts.get(key, 0)
        return positions

    def markers_only(self, key: Partition, position: int, end: int) -> bool | None:
        """What is known of the records [position, end): True only markers or aborted data,
        False real records, None not known (never probed, or the offsets moved since)."""
        probed = self._probed.get(key)
        if probed is None or probed.position != position:
            return None
        if probed.markers_only:
            # Anything written since may be data: only the very gap that was probed is known.
            return True if end == probed.end else None
        # Records found stay there while the group stands still (end only grows).
        return False if end >= probed.end else None

    def to_probe(
        self,
        end_offsets: Mapping[Partition, int],
        committed: Mapping[Partition, int | None],
        log_start: Mapping[Partition, int] | None = None,
    ) -> dict[Partition, Gap]:
        """Lagging partitions whose position has not advanced since the last sample (or that
        are new here) and whose gap is not known yet: {partition: (position, end)}. A group
        that is moving needs no probe: it is making progress whatever its lag."""
        wanted: dict[Partition, Gap] = {}
        for key, position in self._positions(end_offsets, committed, log_start).items():
            end = end_offsets[key]
            previous = self._seen.get(key)
            moved = previous is not None and position > previous[0]
            if end > position and not moved and self.markers_only(key, position, end) is None:
                wanted[key] = (position, end)
        return wanted

    def record_probe(self, key: Partition, gap: Gap, markers_only: bool) -> None:
        """Keep what a probe of `gap` found (only conclusive answers belong here)."""
        self._probed[key] = _Probed(gap[0], gap[1], markers_only)

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
        partitions: dict[Partition, PartitionLag] = {}
        for key, position in self._positions(end_offsets, committed, log_start).items():
            end = end_offsets[key]
            behind = max(0, end - position)
            markers = behind if behind and self.markers_only(key, position, end) else 0
            lag = behind - markers
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
                markers=markers,
            )
        for gone in set(self._seen) - set(end_offsets):
            del self._seen[gone]
        for key in list(self._probed):  # a gap the group moved past is of no further use
            if key not in partitions or self._probed[key].position != partitions[key].position:
                del self._probed[key]
        return LagSample(now, partitions)


class ConsumerLag:
    """Samples the lag of `group_id` on the partitions `assignment()` names.

    `__init__` only stores; `start()` opens the three clients; `stop()` closes them (safe twice).
    `client_options` are aiokafka keyword arguments (bootstrap_servers, security options).
    `probe_timeout_s` bounds one sample's marker probes; what they leave undecided counts as lag.
    """

    def __init__(
        self,
        group_id: str,
        assignment: Callable[[], Iterable[Partition]],
        client_options: Mapping[str, Any],
        *,
        timeout_s: float = 10.0,
        probe_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if probe_timeout_s <= 0:
            raise ValueError(f"probe_timeout_s must be positive, got {probe_timeout_s}")
        self.group_id = group_id
        self._assignment = assignment
        self._options = dict(client_options)
        self._timeout_s = timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._clock = clock
        self._tracker = LagTracker()
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._prober: AIOKafkaConsumer | None = None
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
        prober = AIOKafkaConsumer(
            **self._options,
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=timeout_ms,
            isolation_level="read_committed",  # skips markers and aborted data: the point
            auto_offset_reset="none",  # a reset to the end would look like "markers only"
            fetch_max_wait_ms=100,  # at the end the broker would hold each fetch 500 ms
        )
        try:
            await admin.start()
            await consumer.start()
            await prober.start()
            # Let the consumers' background tasks begin: aiokafka 0.14's stop() re-raises the
            # CancelledError of a task cancelled before it ever ran.
            await asyncio.sleep(0)
        except BaseException:
            await prober.stop()
            await consumer.stop()
            await admin.close()
            raise
        self._admin, self._consumer, self._prober = admin, consumer, prober

    async def stop(self) -> None:
        prober, self._prober = self._prober, None
        consumer, self._consumer = self._consumer, None
        admin, self._admin = self._admin, None
        if prober is not None:
            await prober.stop()
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
        if self._admin is None or self._consumer is None or self._prober is None:
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
        gaps = self._tracker.to_probe(ends, committed, starts)
        if gaps:
            for key, markers_only in (await self._probe(self._prober, gaps)).items():
                self._tracker.record_probe(key, gaps[key], markers_only)
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

    async def _probe(
        self, prober: AIOKafkaConsumer, gaps: Mapping[Partition, Gap]
    ) -> dict[Partition, bool]:
        """For each gap, True when a read_committed fetch from its position reaches its end
        without a record below the end, False when such a record comes back; a gap left
        undecided within `probe_timeout_s` (or on a broker error) is left out."""
        tps = {TopicPartition(*key): key for key in gaps}
        found: dict[Partition, bool] = {}
        prober.assign(list(tps))
        try:
            for tp, key in tps.items():
                prober.seek(tp, gaps[key][0])
            pending = set(tps)
            async with asyncio.timeout(self._probe_timeout_s):
                while pending:
                    # Short polls: a fetch of markers alone returns no records, only moves the
                    # position, and getmany would wait out its whole timeout for records.
                    batch = await prober.getmany(*pending, timeout_ms=100)
                    for tp in list(pending):
                        end = gaps[tps[tp]][1]
                        if any(record.offset < end for record in batch.get(tp, ())):
                            found[tps[tp]] = False
                        elif await prober.position(tp) >= end:
                            found[tps[tp]] = True
                        else:
                            continue
                        pending.discard(tp)
                        prober.pause(tp)  # decided: stop fetching it
        except TimeoutError:
            log.debug(
                "lag probe of group %s undecided for %d partition(s)",
                self.group_id,
                len(gaps) - len(found),
            )
        except (KafkaError, OSError) as exc:
            log.debug("lag probe of group %s failed: %r", self.group_id, exc)
        finally:
            # No background fetching between samples. Not unsubscribe(): aiokafka 0.14's fetcher
            # can swallow stop()'s cancellation while it drops the old assignment, then waits
            # for a new one forever (stop() hung when called just after a probe).
            prober.pause(*tps)
        return found
