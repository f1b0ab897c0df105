"""The index stage: a batch of prediction records -> Elasticsearch, dead letters, then ack.

A predictions offset is acked only after Elasticsearch accepted its document, or after the
record went to `inflow.predictions.dlq` because it can never be indexed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec

from indexer import BulkOutcome
from indexer.client import describe_es_error
from schemas import DecodeError, ErrorCode, Stage, decode_prediction
from streams.delivery.deadletter import DeadLetterWriter
from streams.delivery.records import InputRecord, Publisher, RecordLimits
from streams.delivery.retry import RetryPolicy
from streams.ops.metrics import Metrics

log = logging.getLogger(__name__)


class DocumentWriter(Protocol):
    async def bulk_index(self, docs: Sequence[Mapping[str, Any]]) -> BulkOutcome: ...


class IndexStage:
    def __init__(
        self,
        writer: DocumentWriter,
        publisher: Publisher,
        dlq_topic: str,
        metrics: Metrics,
        retry: RetryPolicy | None = None,
        limits: RecordLimits | None = None,
    ) -> None:
        self._retry = retry or RetryPolicy()
        self._bulk_retry = self._retry.with_backoff(1.0, 30.0)
        self._writer = writer
        self._dead_letters = DeadLetterWriter(publisher, metrics, self._retry, limits)
        self._dlq_topic = dlq_topic
        self._metrics = metrics

    async def handle_batch(self, records: Sequence[InputRecord]) -> None:
        docs: list[dict[str, Any]] = []
        by_id: dict[str, InputRecord] = {}
        versions: dict[str, str] = {}  # id -> the engine version that made the prediction
        for record in records:
            decoded = decode_prediction(record.value or b"")
            if isinstance(decoded, DecodeError):
                await self._dead_letter(record, decoded)
                continue
            docs.append(msgspec.to_builtins(decoded))
            by_id[decoded.id] = record  # a re-delivered id keeps its newest record
            versions[decoded.id] = decoded.model.version
        if docs:
            # The writer retries on its own; if Elasticsearch stays down we keep trying and
            # never ack, so nothing is committed that the index has not accepted. A permanent
            # refusal of the whole request (credentials, permissions) parks the batch unacked
            # with the worker not ready; refused documents come back in `outcome.rejected`.
            outcome = await self._bulk_retry.call(
                lambda: self._writer.bulk_index(docs),
                what="bulk index",
                condition="index",
                describe=describe_es_error,
            )
            self._metrics.indexed.inc(len(outcome.indexed_ids))
            for rejected in outcome.rejected:
                owner = by_id.get(rejected.id or "")
                if owner is None:
                    log.error("index rejected an unknown id %r: %s", rejected.id, rejected.reason)
                    continue
                self._metrics.index_rejected.inc()
                await self._dead_letter(
                    owner,
                    DecodeError(ErrorCode.INDEX_REJECTED, rejected.reason),
                    engine_version=versions.get(rejected.id or ""),
                )
        for record in records:
            record.ack()

    async def _dead_letter(
        self, record: InputRecord, error: DecodeError, engine_version: str | None = None
    ) -> None:
        stage = Stage.INDEX if error.code == ErrorCode.INDEX_REJECTED else Stage.DECODE
        await self._dead_letters.send(self._dlq_topic, record, error, stage, engine_version)


class IndexBuffer:
    """Collects prediction records and hands them to the stage by count or by age.

    Our own buffer rather than Faust's `take_events`, which acks its buffered events when the
    agent is cancelled, even if they were never indexed.
    """

    def __init__(self, stage: IndexStage, max_size: int, max_wait_ms: int) -> None:
        self._stage = stage
        self._max_size = max_size
        self._max_wait_s = max_wait_ms / 1000
        self._records: list[InputRecord] = []
        self._oldest = 0.0
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._timer is None:
            self._timer = asyncio.create_task(self._flush_when_old(), name="inflow-index-timer")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        await self.flush()

    async def add(self, record: InputRecord) -> None:
        if not self._records:
            self._oldest = time.monotonic()
        self._records.append(record)
        if len(self._records) >= self._max_size:
            await self.flush()  # the agent waits here: backpressure while the index is slow

    async def flush(self) -> None:
        async with self._lock:
            batch, self._records = self._records, []
            if batch:
                await self._stage.handle_batch(batch)

    async def _flush_when_old(self) -> None:
        tick = max(0.01, self._max_wait_s / 4)
        while True:
            await asyncio.sleep(tick)
            if self._records and time.monotonic() - self._oldest >= self._max_wait_s:
                await self.flush()
