"""``BulkWriter``: index Prediction documents with idempotent ids and bounded retries."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, Self, cast

from elasticsearch import ApiError, AsyncElasticsearch, TransportError

from indexer.actions import (
    EncodedAction,
    ItemOutcome,
    ItemStatus,
    build_action,
    chunk_actions,
    encode_action,
    parse_bulk_response,
)
from indexer.client import ClientSlot, EsSettings, describe_es_error
from indexer.errors import IndexRequestError, IndexUnavailable
from indexer.mapping import DEFAULT_ALIAS, ensure_index, validate_alias

log = logging.getLogger(__name__)

Refresh = bool | Literal["wait_for"]

DEFAULT_MAX_CHUNK_DOCS = 500
# Well under Elasticsearch's 100 MB http.max_content_length; 5-15 MB is its advice.
DEFAULT_MAX_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded attempts with capped exponential backoff and jitter."""

    max_attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need 0 <= base_delay <= max_delay")

    def ceiling(self, failures: int) -> float:
        """The longest sleep after ``failures`` (>= 1) failed attempts."""
        # The exponent is clamped so that huge attempt counts cannot overflow a float.
        return min(self.max_delay, self.base_delay * 2.0 ** min(failures - 1, 60))

    def delay(self, failures: int, rng: random.Random) -> float:
        """Sleep before the next attempt: uniform in [ceiling/2, ceiling] ("equal jitter"),
        so that writers that failed together do not retry together, yet never spin."""
        top = self.ceiling(failures)
        return top / 2 + rng.uniform(0.0, top / 2)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A document the server (or the encoder) refused for good; the caller dead-letters it."""

    id: str | None
    doc: Mapping[str, Any]
    reason: str
    status: int | None  # HTTP status of the item; None when refused before sending


@dataclass(slots=True)
class BulkOutcome:
    """What became of every document of one ``bulk_index`` call, in input order."""

    indexed_ids: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class BulkObserver(Protocol):
    """Told about every bulk request and retry (for metrics); must not raise or block."""

    def on_bulk_request(self, seconds: float) -> None:
        """One bulk HTTP request ended (answered or failed) after `seconds`."""
        ...

    def on_bulk_retry(self, pending: int) -> None:
        """A round failed for `pending` documents; after the backoff they are sent again now."""
        ...


class _RetriableRequest(Exception):
    """A whole bulk request failed in a way that may pass on a later attempt."""


# Which alias a document is written through (indexer.mapping.ModelIndices.target): one index
# per model behind the read alias.
Route = Callable[[Mapping[str, Any]], Awaitable[str]]


class BulkWriter:
    """Writes documents through an alias with the bulk API.

    ``__init__`` only validates; ``start()`` opens the client and ensures the index;
    ``stop()`` closes what ``start()`` opened (an injected client stays open).
    """

    def __init__(
        self,
        settings: EsSettings | None = None,
        *,
        client: AsyncElasticsearch | None = None,
        alias: str = DEFAULT_ALIAS,
        retry: RetryPolicy | None = None,
        refresh: Refresh | None = None,
        max_chunk_docs: int = DEFAULT_MAX_CHUNK_DOCS,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        ensure: bool = True,
        rng: random.Random | None = None,
        observer: BulkObserver | None = None,
        route: Route | None = None,
    ) -> None:
        if max_chunk_docs < 1 or max_chunk_bytes < 1:
            raise ValueError("max_chunk_docs and max_chunk_bytes must be >= 1")
        self._slot = ClientSlot(settings, client)
        self._alias = validate_alias(alias)
        self._retry = retry or RetryPolicy()
        self._refresh = refresh
        self._max_docs = max_chunk_docs
        self._max_bytes = max_chunk_bytes
        self._ensure = ensure
        self._rng = rng or random.Random()
        self._observer = observer
        self._route = route  # the write alias of each document (default: `alias`)

    @property
    def alias(self) -> str:
        return self._alias

    async def start(self) -> None:
        """Open the client and (unless ``ensure=False``) create template, index and alias."""
        es = self._slot.open()
        if not self._ensure:
            return
        try:
            await self._ensure_with_retries(es)
        except BaseException:
            await self._slot.close()
            raise

    async def stop(self) -> None:
        """Close the client if this writer opened it. Safe to call twice."""
        await self._slot.close()

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

    async def refresh(self) -> None:
        """Make everything written so far searchable (tests; not needed in production)."""
        await self._slot.get().indices.refresh(index=self._alias)

    async def bulk_index(self, docs: Sequence[Mapping[str, Any]]) -> BulkOutcome:
        """Index ``docs`` (``_id`` = ``doc["id"]``), retrying what may pass later.

        Returns the ids indexed and the documents refused for good. Raises
        ``IndexUnavailable`` if some documents could still not be written after
        every attempt: the caller must then not commit its offsets.
        """
        es = self._slot.get()
        indexed: dict[int, str] = {}
        rejected: dict[int, Rejected] = {}
        pending: list[EncodedAction] = []
        for position, doc in enumerate(docs):
            try:
                target = self._alias if self._route is None else await self._route(doc)
                action = build_action(doc, target)
                pending.append(EncodedAction(position, action["_id"], doc, encode_action(action)))
            except ValueError as exc:
                doc_id = doc.get("id")
                rejected[position] = Rejected(
                    id=doc_id if isinstance(doc_id, str) else None,
                    doc=doc,
                    reason=f"invalid document: {exc}",
                    status=None,
                )

        failures = 0
        while pending:
            pending, error = await self._send_round(es, pending, indexed, rejected)
            if pending:
                failures += 1
                await self._after_failure("bulk", failures, error, pending)
                if self._observer is not None:
                    self._observer.on_bulk_retry(len(pending))
        return BulkOutcome(
            indexed_ids=[indexed[p] for p in sorted(indexed)],
            rejected=[rejected[p] for p in sorted(rejected)],
        )

    async def _send_round(
        self,
        es: AsyncElasticsearch,
        pending: list[EncodedAction],
        indexed: dict[int, str],
        rejected: dict[int, Rejected],
    ) -> tuple[list[EncodedAction], str]:
        """Send every pending action once; return those to try again and the last error."""
        again: list[EncodedAction] = []
        error = ""
        request_failed = False
        for chunk in chunk_actions(pending, self._max_docs, self._max_bytes):
            if request_failed:  # the server just failed a whole request: do not hammer it
                again.extend(chunk)
                continue
            try:
                outcomes = await self._send_chunk(es, chunk)
            except _RetriableRequest as exc:
                request_failed, error = True, str(exc)
                again.extend(chunk)
                continue
            for action, outcome in zip(chunk, outcomes, strict=True):
                if outcome.status is ItemStatus.OK:
                    indexed[action.position] = action.doc_id
                elif outcome.status is ItemStatus.REJECTED:
                    rejected[action.position] = Rejected(
                        action.doc_id, action.doc, outcome.reason or "rejected", outcome.http_status
                    )
                else:
                    again.append(action)
                    error = f"{action.doc_id!r}: HTTP {outcome.http_status} {outcome.reason}"
        return again, error

    async def _send_chunk(
        self, es: AsyncElasticsearch, chunk: list[EncodedAction]
    ) -> list[ItemOutcome]:
        """One HTTP call; whole-request failures become ``_RetriableRequest`` or raise."""
        # Pre-encoded lines go through as they are (the ndjson serializer passes bytes),
        # which the client's type hints do not describe.
        operations = cast(Sequence[Mapping[str, Any]], [a.data for a in chunk])
        kwargs: dict[str, Any] = {"require_alias": True}
        if self._refresh is not None:
            kwargs["refresh"] = self._refresh
        started = time.perf_counter()
        try:
            response = await es.bulk(operations=operations, **kwargs)
        except TransportError as exc:  # connection refused/reset, timeout, TLS
            raise _RetriableRequest(describe_es_error(exc)) from exc
        except ApiError as exc:
            status = exc.meta.status
            if status == 429 or status >= 500:
                raise _RetriableRequest(describe_es_error(exc)) from exc
            raise IndexRequestError(
                f"bulk refused: {describe_es_error(exc)}", status=status
            ) from exc
        finally:
            if self._observer is not None:
                self._observer.on_bulk_request(time.perf_counter() - started)
        try:
            return parse_bulk_response(response.body, len(chunk))
        except (ValueError, AttributeError, TypeError) as exc:  # a broken reply confirms nothing
            raise _RetriableRequest(f"malformed bulk response: {exc}") from exc

    async def _after_failure(
        self, what: str, failures: int, error: str, pending: Sequence[EncodedAction]
    ) -> None:
        """Sleep before the next attempt, or raise ``IndexUnavailable`` when none is left."""
        if failures >= self._retry.max_attempts:
            raise IndexUnavailable(
                f"{what} failed {failures} times; last error: {error}",
                attempts=failures,
                pending_ids=[a.doc_id for a in pending],
            )
        delay = self._retry.delay(failures, self._rng)
        log.warning("%s failed (attempt %d): %s; retrying in %.2fs", what, failures, error, delay)
        await asyncio.sleep(delay)

    async def _ensure_with_retries(self, es: AsyncElasticsearch) -> None:
        failures = 0
        while True:
            try:
                await ensure_index(es, self._alias)
                return
            except TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
            except ApiError as exc:
                if exc.meta.status != 429 and exc.meta.status < 500:
                    raise
                error = f"HTTP {exc.meta.status}: {exc}"
            failures += 1
            await self._after_failure("ensure index", failures, error, [])
