"""The infer stage: raw input record -> one prediction or one dead letter, then ack.

Independent of Faust: the agent hands each record over as an `InputRecord` with an `ack`
callback, and output goes through the small `Publisher` interface. An input offset becomes
committable (ack) only after its prediction or dead letter was acknowledged by the broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from schemas import (
    HEADER_REPLAY_COUNT,
    DecodeError,
    ErrorCode,
    ModelRef,
    Prediction,
    Source,
    Stage,
    TextEvent,
    dead_letter_headers,
    decode_event,
    encode_prediction,
    now_rfc3339,
    replay_count,
    rfc3339_from_ms,
)
from streams.batcher import Batcher, InferenceFailed, ItemResult
from streams.metrics import Metrics
from streams.retry import RetryPolicy
from streams.rollout import CandidateFailed, Rollout, route_key

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


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
    ack: Callable[[], object]
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


@dataclass(frozen=True, slots=True)
class InferTopics:
    predictions: str
    dead_letters: str


class InferStage:
    """Decode -> batch -> publish -> ack, with at most `max_in_flight` records open."""

    def __init__(
        self,
        batcher: Batcher,
        publisher: Publisher,
        topics: InferTopics,
        metrics: Metrics,
        max_in_flight: int = 256,
        retry: RetryPolicy | None = None,
        rollout: Rollout | None = None,
    ) -> None:
        """With `rollout`, texts go through it (a candidate engine may take a share of keys,
        streams.rollout); without, straight to `batcher`."""
        self._batcher = batcher
        self._rollout = rollout
        self._retry = retry or RetryPolicy()
        self._publisher = publisher
        self._topics = topics
        self._metrics = metrics
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def handle(self, record: InputRecord) -> None:
        """Take one record; returns once it is queued (waits when too many are open)."""
        await self._slots.acquire()
        task = asyncio.create_task(self._process(record))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def drain(self) -> None:
        """Wait until every record taken so far is answered and acked."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _process(self, record: InputRecord) -> None:
        self._metrics.events_in.inc()
        decoded = decode_event(
            record.value, topic=record.topic, partition=record.partition, offset=record.offset
        )
        if isinstance(decoded, DecodeError):
            await self._dead_letter(record, decoded, Stage.DECODE)
        else:
            try:
                if self._rollout is not None:
                    key = route_key(record.key, decoded.id)
                    result = await self._rollout.submit(key, decoded.text)
                else:
                    result = await self._batcher.submit(decoded.text)
            except InferenceFailed as exc:
                error = DecodeError(ErrorCode.INFERENCE_FAILED, str(exc))
                version = exc.version if isinstance(exc, CandidateFailed) else None
                await self._dead_letter(record, error, Stage.INFER, version)
            else:
                await self._publish_prediction(record, decoded, result)
        record.ack()

    async def _publish_prediction(
        self, record: InputRecord, event: TextEvent, result: ItemResult
    ) -> None:
        prediction = build_prediction(record, event, result)
        value = encode_prediction(prediction)
        await self._send(
            self._topics.predictions, event.id.encode(), value, carried_headers(record)
        )
        self._metrics.observe_prediction(
            prediction.model.version, prediction.label, prediction.scores
        )
        self._metrics.queue_ms.observe(result.queue_ms)
        self._metrics.observe_published(event.ts_ms, record.timestamp)

    async def _dead_letter(
        self, record: InputRecord, error: DecodeError, stage: Stage, version: str | None = None
    ) -> None:
        """`version`: the engine that failed, when not the active one (a canary's candidate)."""
        identity = self._batcher.identity if stage == Stage.INFER else None
        if version is None and identity is not None:
            version = identity.version
        headers = dead_letter_headers(
            error,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=stage,
            replay_count=record.replay_count,
            engine_version=version,
        )
        # The value stays the original bytes; a tombstone stays a tombstone (None, not b"").
        await self._send(self._topics.dead_letters, record.key, record.value, headers)
        self._metrics.dead_letters.labels(code=error.code).inc()
        log.info(
            "dead letter %s:%d:%d %s: %s",
            record.topic,
            record.partition,
            record.offset,
            error.code,
            error.message,
        )

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None
    ) -> None:
        async def attempt() -> None:
            await self._publisher.publish(topic, key, value, headers)

        # Retriable errors are retried; a permanent one (a topic that refuses the record,
        # authorization) parks this record unacked: one ERROR line, and the stalled consumer
        # fails /health/live (streams.retry); Kafka's own readiness is the worker's probe.
        await self._retry.call(
            attempt,
            what=f"publish to {topic}",
            condition=None,
            on_retry=lambda _attempt, _exc: self._metrics.publish_retries.inc(),
        )


def build_prediction(record: InputRecord, event: TextEvent, result: ItemResult) -> Prediction:
    model = result.model
    return Prediction(
        id=event.id,
        text=event.text,
        label=result.label,
        scores=result.scores,
        embedding=float32_values(result.embedding),
        model=ModelRef(model.name, model.version, model.backend, model.precision),
        truncated=result.truncated,
        event_ts=None if event.ts_ms is None else rfc3339_from_ms(event.ts_ms),
        processed_ts=now_rfc3339(),
        metadata=event.metadata,
        source=Source(record.topic, record.partition, record.offset),
        task=model.task,
        embedding_dim=model.embedding_dim,
    )


def float32_values(values: npt.NDArray[np.float32]) -> list[float]:
    """`values` as Python floats rounded to 9 significant digits: exactly the float32 values
    (9 digits identify any float32), written in ~12 JSON characters instead of ~20 for the
    float64 expansion of a float32 (a 384-float embedding: ~5 KB instead of ~8 KB)."""
    x = np.asarray(values, dtype=np.float64)
    magnitude = np.floor(np.log10(np.abs(x), where=x != 0, out=np.zeros_like(x)))
    scale = 10.0 ** np.clip(8 - magnitude, 0, 22)
    rounded: list[float] = (np.rint(x * scale) / scale).tolist()
    return rounded
