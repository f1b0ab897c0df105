"""The infer stage: raw input record -> one prediction or one dead letter, then answer.

Independent of Faust: the agent hands each record over as an `InputRecord` whose `ack` is the
offset ledger's answer (`streams.delivery.ledger`), and output goes through the small `Publisher`
interface. A record is answered only after its prediction or dead letter was acknowledged by
the broker. Nothing that belongs to one record stops it from ending somewhere: bad input, an
engine that fails on the text, a prediction over the predictions topic's size limit (checked
before sending, `streams.delivery.records.RecordLimits`, and on the broker's refusal), and any
unexpected error while processing it each become a dead letter with their own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas import (
    DecodeError,
    ErrorCode,
    ModelRef,
    PassageVector,
    Prediction,
    Source,
    Stage,
    TextEvent,
    decode_event,
    encode_prediction,
    now_rfc3339,
    rfc3339_from_ms,
)
from streams.delivery.batcher import Batcher, InferenceFailed, ItemResult
from streams.delivery.deadletter import DeadLetterWriter
from streams.delivery.records import (
    Headers,
    InputRecord,
    Publisher,
    RecordLimits,
    carried_headers,
    record_size,
)
from streams.delivery.retry import RetryPolicy, is_record_too_large
from streams.ops.metrics import Metrics
from streams.rollout.canary import CandidateFailed, Rollout, route_key

log = logging.getLogger(__name__)

__all__ = ["Headers", "InferStage", "InferTopics", "InputRecord", "Publisher", "build_prediction"]


@dataclass(frozen=True, slots=True)
class InferTopics:
    predictions: str
    dead_letters: str


class InferStage:
    """Decode -> batch -> publish -> answer, with at most `max_in_flight` records open."""

    def __init__(
        self,
        batcher: Batcher,
        publisher: Publisher,
        topics: InferTopics,
        metrics: Metrics,
        max_in_flight: int = 256,
        retry: RetryPolicy | None = None,
        rollout: Rollout | None = None,
        limits: RecordLimits | None = None,
    ) -> None:
        """With `rollout`, texts go through it (a candidate engine may take a share of keys,
        streams.rollout.canary); without, straight to `batcher`."""
        self._batcher = batcher
        self._rollout = rollout
        self._retry = retry or RetryPolicy()
        self._publisher = publisher
        self._topics = topics
        self._metrics = metrics
        self._limits = limits or RecordLimits()
        self._dead_letters = DeadLetterWriter(publisher, metrics, self._retry, self._limits)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def handle(self, record: InputRecord) -> None:
        """Take one record; returns once it is queued (waits when too many are open)."""
        await self._slots.acquire()
        task = asyncio.create_task(self._process(record, time.perf_counter()))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def drain(self) -> None:
        """Wait until every record taken so far is answered."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the records taken so far; cancel the rest (unanswered,
        so never committed: the partition's next owner takes them again). Returns how many."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), timeout_s)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        if left:
            log.warning(
                "stop: %d records still unanswered after %.0fs (parked or in flight): not "
                "committed, the next owner of their partitions takes them again",
                len(left),
                timeout_s,
            )
        return len(left)

    async def _process(self, record: InputRecord, taken: float) -> None:
        self._metrics.events_in.inc()
        try:
            await self._answer(record, taken)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug met by this record: it still ends as a dead letter
            log.error(
                "%s:%d:%d: processing failed (%s: %s): dead-lettered",
                record.topic,
                record.partition,
                record.offset,
                type(exc).__name__,
                exc,
            )
            error = DecodeError(ErrorCode.PROCESSING_FAILED, f"{type(exc).__name__}: {exc}")
            await self._dead_letters.send(self._topics.dead_letters, record, error, Stage.INFER)
        record.ack()

    async def _answer(self, record: InputRecord, taken: float) -> None:
        decoded = decode_event(
            record.value, topic=record.topic, partition=record.partition, offset=record.offset
        )
        if isinstance(decoded, DecodeError):
            await self._dead_letter(record, decoded, Stage.DECODE)
            return
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
            return
        await self._publish_prediction(record, decoded, result, taken)

    async def _publish_prediction(
        self, record: InputRecord, event: TextEvent, result: ItemResult, taken: float
    ) -> None:
        prediction = build_prediction(record, event, result)
        topic = self._topics.predictions
        key, value, headers = (
            event.id.encode(),
            encode_prediction(prediction),
            carried_headers(record),
        )
        limit = self._limits.max_bytes(topic)
        size = record_size(key, value, headers)
        if size > limit:
            too_large = f"the prediction takes {size} bytes, over the {limit} that {topic} takes"
            await self._too_large(record, too_large, result)
            return
        try:
            await self._send(topic, key, value, headers)
        except Exception as exc:  # only a refusal for size comes back (per_record below)
            await self._too_large(record, f"{topic} refused the prediction: {exc}", result)
            return
        self._metrics.observe_prediction(
            prediction.model.version, prediction.label, prediction.scores
        )
        self._metrics.queue_ms.observe(result.queue_ms)
        self._metrics.observe_published(event.ts_ms, record.timestamp)
        # The worker's own latency: what a latency target steers by (streams.delivery.latency).
        answered_s = time.perf_counter() - taken
        self._metrics.taken_to_acked.observe(answered_s)
        self._batcher.observe_latency(answered_s * 1000)

    async def _too_large(self, record: InputRecord, why: str, result: ItemResult) -> None:
        error = DecodeError(
            ErrorCode.PREDICTION_TOO_LARGE,
            f"{why} (max.message.bytes / max_request_size): shorten the event's metadata "
            "or raise the topic's limit, then replay",
        )
        await self._dead_letter(record, error, Stage.PUBLISH, result.model.version)

    async def _dead_letter(
        self, record: InputRecord, error: DecodeError, stage: Stage, version: str | None = None
    ) -> None:
        """`version`: the engine that failed, when not the active one (a canary's candidate)."""
        identity = self._batcher.identity if stage == Stage.INFER else None
        if version is None and identity is not None:
            version = identity.version
        await self._dead_letters.send(self._topics.dead_letters, record, error, stage, version)

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None
    ) -> None:
        async def attempt() -> None:
            await self._publisher.publish(topic, key, value, headers)

        # Retriable errors are retried (a long outage turns readiness condition `kafka`
        # not-ready); a refusal for size is this record's own (raised: a dead letter); any
        # other permanent error (authorization) parks this record unanswered: one ERROR line.
        await self._retry.call(
            attempt,
            what=f"publish to {topic}",
            condition="kafka",
            on_retry=lambda _attempt, _exc: self._metrics.publish_retries.inc(),
            per_record=is_record_too_large,
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
        passages=None
        if result.passages is None
        else [PassageVector(p.start, p.end, float32_values(p.embedding)) for p in result.passages],
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
