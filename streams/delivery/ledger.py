"""The offset ledger: per partition, which taken records are answered; acks go on in offset order.

Inflow answers records out of order by design (one task per record, batches chosen by length,
batches side by side), while a Kafka commit is one number per partition: "everything before
this offset is done". faust-streaming 0.15.3 turns out-of-order acks into that number wrongly:
`Consumer._new_offset` commits over a single unacked record at a partition's head (it holds
back only when `min(acked) - committed > 1`) and checks nothing when the committed offset is 0
or unknown (faust #606, PR #707). So the worker never hands Faust an ack out of order: each
partition's records wait here, answered or not, and a record is passed on (`release`: the
event's ack and its in-flight bytes) only when every record taken before it on its partition
has been passed on. Faust therefore only ever holds a contiguous run of acks from its
committed offset, on which its rule is exact: it commits the end of the answered prefix, never
past a parked or in-flight record, for a new group, at offset 0 and after a revocation alike.

Why feed Faust instead of committing ourselves: Faust's commit loop (its timer, the commit on
stop, the gap bookkeeping of compacted and transactional topics) stays as it is, and the
agents stay plain Faust agents; nothing of Faust's internals is touched.

Revocation ends a partition's generation: its waiting records are forgotten (their answers,
when they come, release nothing; their bytes are given back), and whoever owns the partition
next takes them again from the committed offset (at least once). `tests/unit/test_ledger.py`
checks the rule against Faust's own commit code over random completion orders and crashes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Partition = tuple[str, int]  # (topic, partition); Faust's and aiokafka's TP are such tuples


@dataclass(slots=True, eq=False)
class _Entry:
    offset: int
    ack: Callable[[], object]  # tells Faust the record is done (its offset may be committed)
    free: Callable[[], object]  # gives the record's in-flight bytes back
    answered: bool = False
    forgotten: bool = False  # its partition was revoked before it was released


class OffsetLedger:
    """Records taken per partition, released to Faust as a contiguous answered prefix."""

    def __init__(self) -> None:
        self._waiting: dict[Partition, deque[_Entry]] = {}
        self._released: dict[Partition, int] = {}  # partition -> last offset released + 1

    def take(
        self,
        partition: Partition,
        offset: int,
        ack: Callable[[], object],
        free: Callable[[], object] = lambda: None,
    ) -> Callable[[], None]:
        """Note a record taken from `partition`; returns its answer callback (once it has its
        prediction or dead letter; calling it again does nothing)."""
        waiting = self._waiting.setdefault(partition, deque())
        if waiting and offset <= waiting[-1].offset:
            # The consumer went back (a seek to the committed offset): the records from
            # `offset` on come again, so their earlier copies must not hold the new ones up.
            self._forget_from(partition, offset)
            waiting = self._waiting[partition]
        entry = _Entry(offset, ack, free)
        waiting.append(entry)

        def answer() -> None:
            self._answer(partition, entry)

        return answer

    def _answer(self, partition: Partition, entry: _Entry) -> None:
        if entry.answered:
            return
        entry.answered = True
        if entry.forgotten:
            entry.free()
            return
        waiting = self._waiting.get(partition)
        while waiting and waiting[0].answered:
            done = waiting.popleft()
            self._released[partition] = done.offset + 1
            done.free()
            done.ack()

    def revoke(self, partitions: Iterable[Partition]) -> None:
        """The partitions left this worker: forget what waits there (see the module)."""
        for partition in partitions:
            self._forget_from(partition, None)
            self._waiting.pop(partition, None)
            self._released.pop(partition, None)

    def _forget_from(self, partition: Partition, offset: int | None) -> None:
        waiting = self._waiting.get(partition)
        if not waiting:
            return
        kept: deque[_Entry] = deque()
        for entry in waiting:
            if offset is not None and entry.offset < offset:
                kept.append(entry)
                continue
            entry.forgotten = True
            if entry.answered:  # still waiting for an earlier record: its bytes go back now
                entry.free()
        self._waiting[partition] = kept

    def released_up_to(self, partition: Partition) -> int | None:
        """The offset Faust may commit on `partition` (one past the last released record)."""
        return self._released.get(partition)

    def waiting(self, partition: Partition | None = None) -> int:
        """Records taken and not yet released (answered ones behind an unanswered one too)."""
        if partition is not None:
            return len(self._waiting.get(partition, ()))
        return sum(len(entries) for entries in self._waiting.values())

    def unanswered(self) -> list[tuple[Partition, int]]:
        """(partition, offset) of every taken record still without an answer."""
        return [
            (partition, entry.offset)
            for partition, entries in self._waiting.items()
            for entry in entries
            if not entry.answered
        ]
