"""What the stages take and send: input records, the Publisher interface, and the size limits.

Independent of Faust: an agent hands each record over as an `InputRecord` with an `ack`
callback (the offset ledger's answer, `streams.delivery.ledger`), and output goes through
`Publisher`.

`RecordLimits` knows, before anything is sent, the largest record each output topic takes:
the topic's `max.message.bytes` (read from the broker at start) and the producer's
`max_request_size`, whichever is smaller. A record over it would be refused by the producer
or the broker for good; the stages turn it into a dead letter of its own instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from schemas import HEADER_REPLAY_COUNT, replay_count

Headers = list[tuple[str, bytes]]

# The producers' max_request_size (Faust's and the exactly-once ones): above the brokers'
# default 1 MB record limit, so the topic's own limit is what refuses a record.
MAX_REQUEST_SIZE = 4 * 1024 * 1024
# Kafka's default `message.max.bytes` / topic `max.message.bytes` (1 MiB + 12 bytes): assumed
# for a topic whose configuration could not be read.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# A record batch's header (61 bytes) and one record's varints (length, attributes, timestamp
# and offset deltas, key and value lengths, header count), rounded up: a record of exactly
# `record_size` bytes or less fits a batch of its own within the topic's limit.
BATCH_OVERHEAD = 61 + 40
HEADER_OVERHEAD = 10  # per header: the two length varints


class Publisher(Protocol):
    async def publish(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None
    ) -> None:
        """Return once the broker acknowledged the record (raise if it did not). A None value
        is a tombstone (a Kafka null), not empty bytes."""
        ...


@dataclass(frozen=True, slots=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    ack: Callable[[], object]  # the record is answered: its offset may be committed, in order
    timestamp: float | None = None  # the record's Kafka timestamp, seconds since the epoch
    headers: Headers | None = None  # the record's Kafka headers

    @property
    def replay_count(self) -> int:
        """How often `inflow dlq replay` put this record back (its `inflow.replay.count`)."""
        return replay_count(self.headers)


def carried_headers(record: InputRecord) -> Headers | None:
    """The headers an output of `record` carries on: its replay count, so that a replayed
    event that fails again downstream keeps it (`inflow dlq replay` refuses endless loops)."""
    count = record.replay_count
    return [(HEADER_REPLAY_COUNT, str(count).encode())] if count else None


def record_size(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
    """Bytes the record takes in a record batch of its own (uncompressed), an upper bound."""
    size = BATCH_OVERHEAD + len(key or b"") + len(value or b"")
    for name, header_value in headers or ():
        size += HEADER_OVERHEAD + len(name.encode()) + len(header_value)
    return size


@dataclass(slots=True)
class RecordLimits:
    """The largest record each topic takes (see the module); unknown topics get Kafka's
    default. `topics` is filled from the broker at start (`streams.topics.max_message_bytes`)."""

    max_request_size: int = MAX_REQUEST_SIZE
    topics: dict[str, int] = field(default_factory=dict)

    def update(self, topics: Mapping[str, int]) -> None:
        self.topics.update(topics)

    def max_bytes(self, topic: str) -> int:
        return min(self.max_request_size, self.topics.get(topic, DEFAULT_MAX_MESSAGE_BYTES))

    def fits(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None
    ) -> bool:
        return record_size(key, value, headers) <= self.max_bytes(topic)
