"""Exactly-once inference (INFLOW_PROCESSING_GUARANTEE=exactly_once), on aiokafka directly.

consume -> predict -> produce runs in Kafka transactions: for each polled batch of one input
partition, its predictions and dead letters are sent and the partition's next offset is added
to the same transaction (`send_offsets_to_transaction`), which then commits or aborts as one.
A `read_committed` consumer of `inflow.predictions` therefore sees each prediction once, even
when a worker is killed mid-batch: the dead worker's open transaction is aborted, not
committed, and its partitions are processed again from the last committed offset.

Why not Faust's own exactly_once: its transactional producer has open duplicate bugs (faust
#517, #323) and ties each send to the agent's current event. Here every input partition has
its own transactional producer, `transactional.id = <app_id>.eos.<topic>.<partition>`: when
the partition moves to another worker, that worker's producer starts with the same id, which
aborts the dead owner's open transaction at once and fences it (the pre-KIP-447 scheme that
aiokafka's `send_offsets_to_transaction(offsets, group_id)` supports).

The texts consumer has its own group, `<app_id>.eos` (Faust's group speaks Faust's assignor
protocol; one group cannot mix the two). The index agent stays a Faust agent: documents are
keyed by prediction id, so indexing is idempotent in either mode.

Decoding, batching and dead letters are the infer stage's own (`InferStage`), fed through a
publisher that collects the outputs of one batch for the transaction.

Failures. A batch's outputs are computed once and committed by the worker's one retry policy
(`streams.delivery.retry`): each attempt is a new transaction on a fresh producer when the last one
failed, a retriable error is retried with backoff, a permanent one (a topic that refuses the
record, missing permissions) is one ERROR line and rechecked, and the partition's lag, which
the worker watches in this group too, fails `/health/live`. Every acknowledgement is awaited
before the offsets join the transaction: aiokafka commits a transaction whose produce batch
failed, which lost 4 of 2,400 events in a chaos run. A batch is never skipped: one that was
not committed (revoked, or a bug) rewinds its partition to the group's committed offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from streams.config import Settings
from streams.delivery.batcher import Batcher
from streams.delivery.infer import InferStage, InferTopics
from streams.delivery.records import MAX_REQUEST_SIZE, Headers, InputRecord, RecordLimits
from streams.delivery.retry import RetryPolicy
from streams.kafka import client_options
from streams.ops.metrics import Metrics
from streams.rollout.canary import Rollout

log = logging.getLogger(__name__)

Output = tuple[str, bytes | None, bytes | None, Headers | None]
# A worker that dies mid-transaction without a successor has it aborted after this.
TRANSACTION_TIMEOUT_MS = 30_000


class _Collector:
    """A Publisher that keeps what one batch would publish, for the transaction."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []

    async def publish(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None
    ) -> None:
        self.outputs.append((topic, key, value, headers))


def eos_group(settings: Settings) -> str:
    return f"{settings.app_id}.eos"


class TransactionalInfer:
    """`start()` joins the texts group and runs the loop; `stop()` leaves it cleanly."""

    def __init__(
        self,
        settings: Settings,
        batcher: Batcher,
        metrics: Metrics,
        retry: RetryPolicy | None = None,
        rollout: Rollout | None = None,
        limits: RecordLimits | None = None,
    ) -> None:
        self._settings = settings
        self._limits = limits or RecordLimits()
        self._batcher = batcher
        self._rollout = rollout  # a shadow's or canary's candidate (streams.rollout.canary)
        self._metrics = metrics
        self._retry = retry or RetryPolicy()
        self._topics = InferTopics(settings.predictions_topic, settings.texts_dlq_topic)
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.committed_batches = 0
        self.aborted_batches = 0
        self.failure: str | None = None  # why the loop ended, when it ended on its own
        # Each transaction runs under this lock, and a revocation takes it: the group never
        # moves a partition while one of its transactions is open. A batch whose generation
        # moved on (a rebalance came between fetch and commit) is never committed: its
        # partition is rewound to the committed offset and whoever owns it now redoes it.
        self._lock = asyncio.Lock()
        self._generation = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment()) if self._consumer is not None else set()

    async def start(self) -> None:
        s = self._settings
        self._consumer = AIOKafkaConsumer(
            **client_options(s),
            group_id=eos_group(s),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            rebalance_timeout_ms=int(s.rebalance_timeout_s * 1000),
            max_poll_records=s.max_in_flight,
        )
        await self._consumer.start()
        self._consumer.subscribe([s.texts_topic], listener=_Listener(self))
        self._task = asyncio.create_task(self._loop(), name="inflow-eos-infer")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        self.failure = f"exactly-once loop ended: {type(exc).__name__}: {exc}"
        log.error("%s (restart the worker)", self.failure)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        await self._close_producers(list(self._producers))

    async def _producer_for(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self._producers.get(tp)
        if producer is not None:
            return producer
        producer = AIOKafkaProducer(
            **client_options(self._settings),
            transactional_id=f"{self._settings.app_id}.eos.{tp.topic}.{tp.partition}",
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_request_size=MAX_REQUEST_SIZE,
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        )
        try:
            await producer.start()  # init_transactions: aborts and fences a previous owner
        except BaseException:
            await _stop_quietly(producer)
            raise
        self._producers[tp] = producer
        return producer

    async def _close_producers(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            producer = self._producers.pop(tp, None)
            if producer is not None:
                await _stop_quietly(producer)

    async def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            generation = self._generation
            batches = await consumer.getmany(timeout_ms=500)
            for tp, messages in batches.items():
                if messages:
                    await self._process(consumer, tp, messages, generation)

    async def _process(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, messages: Any, generation: int
    ) -> None:
        """Predict one fetched batch of `tp` and commit its outputs with its offsets in one
        transaction, retried (the same outputs, in a new transaction) until it commits or the
        partition moves; whatever happens, no offset moves past a batch that did not commit."""
        first, last = messages[0].offset, messages[-1].offset
        try:
            outputs = await self._predict(messages)
            await self._retry.call(
                lambda: self._transact(tp, outputs, last + 1, generation),
                what=f"exactly-once transaction for {tp.topic}[{tp.partition}] {first}-{last}",
                condition="kafka",  # a parked transaction: not ready, with the reason
                per_record=lambda exc: isinstance(exc, _Revoked),  # not retried: redone
            )
        except asyncio.CancelledError:
            raise
        except _Revoked:
            log.info(
                "%s[%d] %d-%d fetched before a rebalance: not committed, redone by its owner",
                tp.topic,
                tp.partition,
                first,
                last,
            )
            await rewind_to_committed(consumer, tp)
        except Exception as exc:  # not one of Kafka's: ours (a bug), never skip the batch
            log.exception("%s[%d] %d-%d failed: rewinding", tp.topic, tp.partition, first, last)
            self.aborted_batches += 1
            await asyncio.sleep(1.0)
            try:
                await rewind_to_committed(consumer, tp)
            except KafkaError as rewind_exc:
                raise exc from rewind_exc  # the position is unknown: end the loop, loudly
            return
        else:
            self.committed_batches += 1

    async def _predict(self, messages: Any) -> list[Output]:
        """Every message's prediction or dead letter, for one transaction. The infer stage turns
        anything that belongs to one record into its dead letter; should a record still end
        unanswered, this raises: the transaction is not committed and the batch is redone."""
        collector = _Collector()
        stage = InferStage(
            self._batcher,
            collector,
            self._topics,
            self._metrics,
            max_in_flight=len(messages),
            rollout=self._rollout,
            limits=self._limits,
        )
        answered: set[int] = set()

        def answer(offset: int) -> Callable[[], None]:
            return lambda: answered.add(offset)

        for message in messages:
            await stage.handle(
                InputRecord(
                    message.topic,
                    message.partition,
                    message.offset,
                    message.key,
                    message.value,
                    answer(message.offset),
                    timestamp=message.timestamp / 1000 if message.timestamp else None,
                    headers=list(message.headers) or None,
                )
            )
        await stage.drain()
        missing = [m.offset for m in messages if m.offset not in answered]
        if missing:
            raise RuntimeError(f"offsets {missing} ended with no prediction or dead letter")
        return collector.outputs

    async def _transact(
        self, tp: TopicPartition, outputs: list[Output], next_offset: int, generation: int
    ) -> None:
        """One attempt: begin, send every output, wait until the broker acknowledged each,
        add the offset, commit. Any failure aborts; the producer is then replaced, so the next
        attempt starts clean (its init_transactions aborts whatever the old one left open)."""
        async with self._lock:
            if self._generation != generation or tp not in self.assignment():
                raise _Revoked()
            started = time.monotonic()
            try:
                # Bounded, so that a revocation waiting for the lock stays within the group's
                # rebalance timeout; a stuck attempt is aborted and retried.
                await asyncio.wait_for(
                    self._send_and_commit(tp, outputs, next_offset),
                    timeout=self._settings.rebalance_timeout_s / 2,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.aborted_batches += 1
                await self._close_producers([tp])
                if isinstance(exc, ProducerFenced):  # the next attempt's producer fences back
                    raise _Fenced(str(exc)) from exc
                raise
            log.debug(
                "committed %s[%d] up to %d in %.3fs",
                tp.topic,
                tp.partition,
                next_offset,
                time.monotonic() - started,
            )

    async def _send_and_commit(
        self, tp: TopicPartition, outputs: list[Output], next_offset: int
    ) -> None:
        producer = await self._producer_for(tp)
        async with producer.transaction():
            sent = [
                await producer.send(topic, value=value, key=key, headers=headers)
                for topic, key, value, headers in outputs
            ]
            # aiokafka commits a transaction even when one of its produce batches failed
            # (a non-retriable error fails the batch's futures and nothing else): wait for
            # every acknowledgement first, so a failure aborts instead of losing records.
            await asyncio.gather(*sent)
            await producer.send_offsets_to_transaction({tp: next_offset}, eos_group(self._settings))


async def rewind_to_committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
    """Fetch `tp` again from the group's committed offset (no batch is ever skipped)."""
    if tp not in consumer.assignment():
        return  # revoked: the new assignment starts from the committed offset anyway
    committed = await consumer.committed(tp)
    if committed is None:
        committed = (await consumer.beginning_offsets([tp]))[tp]
    # Checked again after the awaits, with no await before the seek: a rebalance while we
    # asked revoked `tp` (seek would raise, and end the loop) and its new assignment, ours
    # or another worker's, starts from the committed offset already.
    if tp in consumer.assignment():
        consumer.seek(tp, committed)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    """Stop a producer that may have failed; its pending batches are abandoned after 10 s
    (stop() flushes them, which never ends while the broker refuses them)."""
    try:
        await asyncio.wait_for(producer.stop(), timeout=10.0)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.debug("producer stop: %s: %s", type(exc).__name__, exc)


class _Revoked(Exception):
    """The batch's partition moved (or is moving) to a new generation: do not commit it."""


class _Fenced(KafkaError):
    """Another producer took this partition's transactional id while we still own the
    partition (a zombie of ours, or a new owner before our revocation ran): retried."""

    retriable = True


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: TransactionalInfer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:  # the first join: nothing fetched yet can be stale
            return
        async with self._owner._lock:  # waits for the transaction in progress to end
            self._owner._generation += 1
            await self._owner._close_producers(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info(
            "exactly-once: consuming %s",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned),
        )
        for tp in assigned:  # opened ahead of the first batch; on failure, by its first attempt
            try:
                await self._owner._producer_for(tp)
            except KafkaError as exc:
                log.warning(
                    "exactly-once: producer for %s[%d] not ready yet: %s",
                    tp.topic,
                    tp.partition,
                    exc,
                )
