"""The one dead-letter writer: the original record's bytes, error headers, sized to fit its topic.

A dead letter keeps the original key and value unchanged and says why in `inflow.*` headers
(`schemas.dead_letter_headers`). When the original is too large for the dead-letter topic
(an input near the texts topic's limit, plus the headers), the dead letter keeps what fits:
the headers, the source coordinates, the original's size and sha256, and a prefix of its
bytes, with `inflow.dlq.truncated: true`. Nothing is dropped silently.

Publishing goes through the worker's one retry policy: a retriable error is retried (after a
few attempts readiness condition `kafka` says so), a permanent one of the system (a topic that
refuses everything, missing permissions) parks the record unacked with one ERROR line. A
refusal for size alone, which the limits read at start did not foresee (a topic changed since),
is fitted again to a conservative size once and sent; never a loop.
"""

from __future__ import annotations

import hashlib
import logging

from schemas import (
    HEADER_ORIGINAL_SHA256,
    HEADER_ORIGINAL_SIZE,
    HEADER_TRUNCATED,
    DecodeError,
    Stage,
    dead_letter_headers,
)
from streams.delivery.records import Headers, InputRecord, Publisher, RecordLimits, record_size
from streams.delivery.retry import RetryPolicy, is_record_too_large
from streams.ops.metrics import Metrics

log = logging.getLogger(__name__)

# When a topic refused a dead letter its limits said would fit: fit it again to this.
FALLBACK_MAX_BYTES = 64 * 1024


class DeadLetterTooLarge(Exception):
    """Even the headers alone do not fit the dead-letter topic: its limit is misconfigured."""

    retriable = False


def fit_dead_letter(
    max_bytes: int, key: bytes | None, value: bytes | None, headers: Headers
) -> tuple[bytes | None, bytes | None, Headers]:
    """The dead letter as it can be sent within `max_bytes`: unchanged when it fits, else a
    prefix of the value (and of the key if need be) with the truncation headers."""
    if record_size(key, value, headers) <= max_bytes:
        return key, value, headers
    original = value or b""
    headers = [
        *headers,
        (HEADER_TRUNCATED, b"true"),
        (HEADER_ORIGINAL_SIZE, str(len(original)).encode()),
        (HEADER_ORIGINAL_SHA256, hashlib.sha256(original).hexdigest().encode()),
    ]
    room = max_bytes - record_size(None, None, headers)
    if room < 0:
        raise DeadLetterTooLarge(
            f"a dead letter's headers alone take {record_size(None, None, headers)} bytes, "
            f"over the topic's limit of {max_bytes}: raise the dead-letter topic's "
            "max.message.bytes"
        )
    key = None if key is None else key[:room]
    room -= len(key or b"")
    return key, None if value is None else original[:room], headers


class DeadLetterWriter:
    """Sends dead letters for both stages (texts and predictions) and counts them."""

    def __init__(
        self,
        publisher: Publisher,
        metrics: Metrics,
        retry: RetryPolicy | None = None,
        limits: RecordLimits | None = None,
    ) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._retry = retry or RetryPolicy()
        self._limits = limits or RecordLimits()

    async def send(
        self,
        topic: str,
        record: InputRecord,
        error: DecodeError,
        stage: Stage,
        engine_version: str | None = None,
    ) -> None:
        """Return once the broker acknowledged the dead letter of `record` on `topic`."""
        headers = dead_letter_headers(
            error,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=stage,
            replay_count=record.replay_count,
            engine_version=engine_version,
        )
        limit = self._limits.max_bytes(topic)
        try:
            await self._publish(topic, record, headers, limit)
        except Exception as exc:  # only a refusal for size comes back (per_record below)
            log.warning("%s refused a dead letter for its size (%s): sending a prefix", topic, exc)
            await self._publish(topic, record, headers, min(limit, FALLBACK_MAX_BYTES), final=True)
        self._metrics.dead_letters.labels(code=error.code).inc()
        log.info(
            "dead letter %s:%d:%d %s: %s",
            record.topic,
            record.partition,
            record.offset,
            error.code,
            error.message,
        )

    async def _publish(
        self, topic: str, record: InputRecord, headers: Headers, limit: int, final: bool = False
    ) -> None:
        async def attempt() -> None:
            # Fitted inside the attempt: headers that cannot fit at all (DeadLetterTooLarge) are
            # a misconfigured topic, parked and reported like any permanent error of the system.
            key, value, fitted = fit_dead_letter(limit, record.key, record.value, headers)
            await self._publisher.publish(topic, key, value, fitted)

        await self._retry.call(
            attempt,
            what=f"publish to {topic}",
            condition="kafka",
            on_retry=lambda _attempt, _exc: self._metrics.publish_retries.inc(),
            # the first refusal for size comes back to `send`; a second one parks
            per_record=None if final else is_record_too_large,
        )
