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
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from streams.batcher import Batcher
from streams.config import Settings
from streams.infer import Headers, InferStage, InferTopics, InputRecord
from streams.kafka import client_options
from streams.metrics import Metrics

log = logging.getLogger(__name__)

Output = tuple[str, bytes | None, bytes | None, Headers | None]


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

    def __init__(self, settings: Settings, batcher: Batcher, metrics: Metrics) -> None:
        self._settings = settings
        self._batcher = batcher
        self._metrics = metrics
        self._topics = InferTopics(settings.predictions_topic, settings.texts_dlq_topic)
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.committed_batches = 0
        self.aborted_batches = 0
        # A batch is computed and committed under this lock, and a revocation takes it: the
        # group never moves a partition while its transaction is open, and a batch fetched
        # before a rebalance (`_generation` moved on) is fetched again, never committed.
        self._lock = asyncio.Lock()
        self._generation = 0

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

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        await self._close_producers(list(self._producers))

    async def _open_producers(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            if tp in self._producers:
                continue
            producer = AIOKafkaProducer(
                **client_options(self._settings),
                transactional_id=f"{self._settings.app_id}.eos.{tp.topic}.{tp.partition}",
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                max_request_size=4 * 1024 * 1024,
                # A worker that dies mid-transaction without a successor is aborted after this.
                transaction_timeout_ms=30_000,
            )
            await producer.start()  # init_transactions: aborts and fences a previous owner
            self._producers[tp] = producer

    async def _close_producers(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            producer = self._producers.pop(tp, None)
            if producer is not None:
                await producer.stop()

    async def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            generation = self._generation
            batches = await consumer.getmany(timeout_ms=500)
            for tp, messages in batches.items():
                if not messages:
                    continue
                async with self._lock:
                    if self._generation != generation:  # fetched before a rebalance
                        if tp in consumer.assignment():
                            consumer.seek(tp, messages[0].offset)
                        continue
                    await self._process(consumer, tp, messages)

    async def _process(self, consumer: AIOKafkaConsumer, tp: TopicPartition, messages: Any) -> None:
        collector = _Collector()
        stage = InferStage(
            self._batcher, collector, self._topics, self._metrics, max_in_flight=len(messages)
        )
        for message in messages:
            await stage.handle(
                InputRecord(
                    message.topic,
                    message.partition,
                    message.offset,
                    message.key,
                    message.value,
                    _noop,
                    timestamp=message.timestamp / 1000 if message.timestamp else None,
                    headers=list(message.headers) or None,
                )
            )
        await stage.drain()
        first, last = messages[0].offset, messages[-1].offset
        started = time.monotonic()
        try:
            producer = self._producers.get(tp)
            if producer is None:  # revoked while we computed: the new owner redoes it
                raise _Revoked()
            async with producer.transaction():
                for topic, key, value, headers in collector.outputs:
                    await producer.send(topic, value=value, key=key, headers=headers)
                await producer.send_offsets_to_transaction(
                    {tp: last + 1}, eos_group(self._settings)
                )
        except _Revoked:
            return
        except (KafkaError, OSError) as exc:
            self.aborted_batches += 1
            log.warning(
                "transaction for %s[%d] offsets %d-%d aborted (%s: %s): processing them again",
                tp.topic,
                tp.partition,
                first,
                last,
                type(exc).__name__,
                exc,
            )
            await self._close_producers([tp])
            await asyncio.sleep(1.0)
            if tp in consumer.assignment():
                await self._open_producers([tp])
                consumer.seek(tp, first)
            return
        self.committed_batches += 1
        log.debug(
            "committed %s[%d] %d-%d in %.3fs",
            tp.topic,
            tp.partition,
            first,
            last,
            time.monotonic() - started,
        )


class _Revoked(Exception):
    pass


def _noop() -> None:
    return None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: TransactionalInfer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._owner._lock:  # waits for the batch in progress to commit or abort
            self._owner._generation += 1
            await self._owner._close_producers(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._owner._open_producers(list(assigned))
        log.info(
            "exactly-once: consuming %s",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned),
        )
