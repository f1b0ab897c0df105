"""The in-flight ceiling: bytes of records taken from Kafka and not yet acked, for both agents.

An agent acquires a record's cost before it hands the record to its stage and releases it on
ack. When the ceiling is reached the agent waits; Faust's stream buffer for those partitions
then fills (at most `stream_buffer_maxsize` records, see `streams.app`) and Faust stops fetching
them. A long index outage therefore costs consumer lag, not memory: what the worker holds is
bounded by the ceiling plus the stream buffers, whatever the outage's length.

A record's cost is its key and value bytes plus `RECORD_OVERHEAD` (the event objects around it
and, for a text, the prediction with its embedding that it becomes while in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)

# A prediction with a 384-float embedding is ~5 KB of JSON; Faust's event objects ~1 KB more.
RECORD_OVERHEAD = 6 * 1024


def record_cost(key: bytes | None, value: bytes | None) -> int:
    return len(key or b"") + len(value or b"") + RECORD_OVERHEAD


class InFlightBudget:
    """A byte ceiling shared by the agents. A record larger than the whole ceiling still passes
    when nothing else is held, so one big record cannot wedge the worker."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0
        self.pauses = 0  # how many times an agent had to wait for room
        self._room = asyncio.Event()  # set on every release: waiters look again
        self._paused_since: float | None = None

    async def acquire(self, cost: int) -> None:
        if self.used + cost > self.max_bytes and self.used > 0:
            self.pauses += 1
            if self._paused_since is None:
                self._paused_since = time.monotonic()
                log.warning(
                    "in-flight ceiling reached (%d of %d bytes held): consumption paused until "
                    "records are acked",
                    self.used,
                    self.max_bytes,
                )
            while self.used + cost > self.max_bytes and self.used > 0:
                self._room.clear()
                await self._room.wait()
        self.used += cost
        self.peak = max(self.peak, self.used)

    def release(self, cost: int) -> None:
        self.used = max(0, self.used - cost)
        if self._paused_since is not None and self.used <= self.max_bytes // 2:
            log.warning(
                "in-flight ceiling: consumption resumed after %.1fs paused",
                time.monotonic() - self._paused_since,
            )
            self._paused_since = None
        self._room.set()
