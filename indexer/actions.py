"""Pure bulk plumbing: documents -> actions -> ndjson chunks; bulk responses -> outcomes.

No I/O here, so every step is unit-tested without a server (the layering follows
elasticsearch-py's ``helpers/actions.py``: expand -> chunk -> send -> parse).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from indexer.mapping import DEFAULT_ALIAS, LATENCY_FIELD
from schemas.codec import parse_rfc3339_ms

# Elasticsearch refuses _id values longer than 512 bytes.
MAX_ID_BYTES = 512
# Item errors that say "the cluster cannot take this now", not "this document is bad",
# whatever their status: dead-lettering on them would drop good data.
RETRIABLE_ERROR_TYPES = frozenset(
    {
        "es_rejected_execution_exception",
        "circuit_breaking_exception",
        "cluster_block_exception",  # e.g. flood-stage disk watermark (429 since 7.x, 403 before)
        "index_not_found_exception",  # alias deleted under us; an operator can restore it
        "unavailable_shards_exception",
        "no_shard_available_action_exception",
        "process_cluster_event_timeout_exception",
    }
)


class ItemStatus(StrEnum):
    """What happened to one document of a bulk request."""

    OK = "ok"
    RETRIABLE = "retriable"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class EncodedAction:
    """One document ready to send: its position in the caller's batch and its ndjson lines."""

    position: int
    doc_id: str
    doc: Mapping[str, Any]
    data: bytes  # action line + source line, each ending in "\n"

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """One parsed item of a bulk response."""

    status: ItemStatus
    http_status: int
    doc_id: str | None
    reason: str | None = None


def latency_ms(doc: Mapping[str, Any]) -> int | None:
    """``processed_ts - event_ts`` in milliseconds, or None when either is missing or not
    RFC 3339. Negative when the producer's clock runs ahead of the worker's: kept as it is."""
    event_ts, processed_ts = doc.get("event_ts"), doc.get("processed_ts")
    if not isinstance(event_ts, str) or not isinstance(processed_ts, str):
        return None
    start, end = parse_rfc3339_ms(event_ts), parse_rfc3339_ms(processed_ts)
    if start is None or end is None:
        return None
    return end - start


def build_action(doc: Mapping[str, Any], alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
    """An ``index`` action with ``_id`` = the event id: re-indexing replaces, never duplicates.

    The source is the document plus ``latency_ms`` (see ``latency_ms``) when it can be
    computed: percentiles need a stored number, since the server runs no scripts.
    """
    doc_id = doc.get("id")
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError(f"document has no string 'id' (got {type(doc_id).__name__})")
    if len(doc_id.encode("utf-8")) > MAX_ID_BYTES:
        raise ValueError(f"document id is longer than {MAX_ID_BYTES} bytes")
    source: Mapping[str, Any] = doc
    latency = latency_ms(doc)
    if latency is not None:
        source = {**doc, LATENCY_FIELD: latency}
    return {"_op_type": "index", "_index": alias, "_id": doc_id, "_source": source}


def _json_default(value: object) -> Any:
    # Plain dicts are the contract, but read-only mappings and array-likes
    # (anything with .tolist()) encode to the same JSON, so accept them.
    if isinstance(value, Mapping):
        return dict(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ENCODER = msgspec.json.Encoder()


def _plain(value: object) -> bool:
    """True when ``value`` holds only str keys, str/int/bool/None and finite floats: then
    msgspec writes the same JSON as the strict stdlib path, about ten times faster."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if kind is dict:
        items: dict[object, object] = value  # type: ignore[assignment]
        return all(type(k) is str for k in items) and all(_plain(v) for v in items.values())
    if kind is list or kind is tuple:
        seq: Sequence[object] = value  # type: ignore[assignment]
        if seq and all(type(x) is float for x in seq):  # an embedding: one C-level sum
            try:
                return math.isfinite(math.fsum(seq))  # type: ignore[arg-type]
            except OverflowError:  # finite values whose sum overflows
                pass
        return all(_plain(x) for x in seq)
    return False


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity are refused since Elasticsearch refuses them too."""
    if _plain(value):
        try:
            return _ENCODER.encode(value)
        except (TypeError, ValueError, OverflowError):  # e.g. an int beyond 64 bits
            pass
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    ).encode("utf-8")


def encode_action(action: Mapping[str, Any]) -> bytes:
    """The two ndjson lines of ``action``; raises ``ValueError`` if it cannot be JSON."""
    header = {action["_op_type"]: {"_index": action["_index"], "_id": action["_id"]}}
    try:
        return dumps(header) + b"\n" + dumps(action["_source"]) + b"\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"document is not valid JSON: {exc}") from exc
    except RecursionError:  # metadata nested deeper than the encoder goes: this document only
        raise ValueError("document is nested too deeply to encode as JSON") from None


def chunk_actions(
    actions: Iterable[EncodedAction], max_count: int, max_bytes: int
) -> Iterator[list[EncodedAction]]:
    """Split ``actions`` into chunks of at most ``max_count`` items and ``max_bytes`` bytes.

    An action larger than ``max_bytes`` on its own travels alone rather than being dropped:
    the server decides whether it is too large.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be >= 1, got {max_count}, {max_bytes}")
    chunk: list[EncodedAction] = []
    size = 0
    for action in actions:
        if chunk and (len(chunk) >= max_count or size + action.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(action)
        size += action.size
    if chunk:
        yield chunk


def classify_item(http_status: int, error_type: str | None = None) -> ItemStatus:
    """ok for 2xx; retriable for 429, 5xx and capacity errors; rejected for other 4xx."""
    if 200 <= http_status < 300 and error_type is None:
        return ItemStatus.OK
    if http_status == 429 or http_status >= 500 or error_type in RETRIABLE_ERROR_TYPES:
        return ItemStatus.RETRIABLE
    return ItemStatus.REJECTED


def format_error(error: object) -> str:
    """A one-line reason from a bulk item's ``error`` (type: reason, then its cause)."""
    if not isinstance(error, Mapping):
        return str(error)
    text = f"{error.get('type', 'error')}: {error.get('reason', '')}".rstrip(": ")
    cause = error.get("caused_by")
    if isinstance(cause, Mapping):
        text += f" (caused by {format_error(cause)})"
    return text


def parse_bulk_response(response: Mapping[str, Any], expected: int) -> list[ItemOutcome]:
    """One outcome per action, in request order; ``ValueError`` if the response is malformed."""
    items = response.get("items")
    if not isinstance(items, Sequence) or len(items) != expected:
        got = len(items) if isinstance(items, Sequence) else "no"
        raise ValueError(f"bulk response has {got} items for {expected} actions")
    outcomes = []
    for item in items:
        # Each item is {"<op_type>": {...}}; the op type is ours, so take the only value.
        (body,) = item.values()
        status = int(body.get("status", 500))
        error = body.get("error")
        error_type = None
        if error is not None:
            error_type = str(error.get("type")) if isinstance(error, Mapping) else "error"
        outcomes.append(
            ItemOutcome(
                status=classify_item(status, error_type),
                http_status=status,
                doc_id=body.get("_id"),
                reason=None if error is None else format_error(error),
            )
        )
    return outcomes
