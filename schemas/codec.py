"""The one run-time decode/validate/encode path for Inflow's wire contracts (msgspec).

Decoding never raises on bad input: it returns a `DecodeError` value that the caller
dead-letters. The rules here match `schemas/json/*.v1.json`; the unit tests check that both
give the same verdict on a table of events.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from schemas.models import (
    EMBEDDING_DIM,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    MAX_TS_MS,
    MIN_TS_MS,
    PREDICTION_VERSION,
    SCHEMA_VERSION,
    TASK_CLASSIFICATION,
    TASK_EMBEDDING,
    TASKS,
    DecodeError,
    ErrorCode,
    Prediction,
    Stage,
    TextEvent,
    WirePrediction,
)

HEADER_ERROR_CODE = "inflow.error.code"
HEADER_ERROR_MESSAGE = "inflow.error.message"
HEADER_ERROR_STAGE = "inflow.error.stage"
HEADER_SOURCE_TOPIC = "inflow.source.topic"
HEADER_SOURCE_PARTITION = "inflow.source.partition"
HEADER_SOURCE_OFFSET = "inflow.source.offset"
HEADER_SCHEMA_VERSION = "inflow.schema.version"
# Set by `inflow dlq replay` on a replayed record, carried by the worker onto its prediction
# and onto a dead letter it becomes again: how often this event has been replayed.
HEADER_REPLAY_COUNT = "inflow.replay.count"
# The engine version serving when the record gave up (infer stage), or that made the
# prediction (index stage): `inflow dlq` filters on it.
HEADER_ENGINE_VERSION = "inflow.engine.version"
# A dead letter too large for its own topic keeps what fits: a prefix of the original value,
# flagged, with the original's size and sha256 (the source coordinates locate the whole).
HEADER_TRUNCATED = "inflow.dlq.truncated"
HEADER_ORIGINAL_SIZE = "inflow.original.size"
HEADER_ORIGINAL_SHA256 = "inflow.original.sha256"
DEAD_LETTER_HEADERS = (
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_STAGE,
    HEADER_SOURCE_TOPIC,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_OFFSET,
    HEADER_SCHEMA_VERSION,
    HEADER_REPLAY_COUNT,
    HEADER_ENGINE_VERSION,
    HEADER_TRUNCATED,
    HEADER_ORIGINAL_SIZE,
    HEADER_ORIGINAL_SHA256,
)
# The longest `inflow.replay.count` read as a count: a signed 64-bit integer's worth.
MAX_REPLAY_COUNT_DIGITS = 18
# A header travels with every dead letter; long exception texts are cut to keep it small.
MAX_ERROR_MESSAGE_CHARS = 1_000
# |‖embedding‖₂ - 1| allowed by decode_prediction: covers fp16 engines' rounding.
EMBEDDING_NORM_TOLERANCE = 1e-2

# RFC 3339 `date-time` (section 5.6), the same pattern as in the JSON Schema files.
# Leap seconds (:60) are not accepted: Python datetimes cannot hold them.
RFC3339_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]"
    r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
    r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
_RFC3339_RE = re.compile(RFC3339_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


class _WireEvent(msgspec.Struct):
    """TextEvent as it arrives; unknown fields are skipped by msgspec without building them."""

    text: str
    id: str | None = None
    metadata: dict[str, Any] | None = None
    # float too: JSON Schema counts 1.7e12 as an integer, so the fast path must as well.
    ts: int | float | str | None = None


class _WireEventOut(msgspec.Struct, omit_defaults=True):
    """What `encode_event` writes: absent optional fields are left out, not sent as null."""

    text: str
    id: str | None = None
    metadata: Mapping[str, Any] | None = None
    ts: int | str | None = None


# Decoders and encoders are reusable and thread-safe; build them once, not per message.
_EVENT_DECODER = msgspec.json.Decoder(_WireEvent)
_ANY_DECODER = msgspec.json.Decoder()
_PREDICTION_DECODER = msgspec.json.Decoder(WirePrediction)
_ENCODER = msgspec.json.Encoder()

_JSON_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "null": "null",
    "array": "an array",
    "object": "an object",
}
_EXPECTED = {
    "text": f"a non-empty string of at most {MAX_TEXT_CHARS} characters",
    "id": f"a string of 1 to {MAX_ID_CHARS} characters",
    "metadata": "an object",
    "ts": "an integer (epoch milliseconds) or an RFC 3339 date-time string",
}
_GOT_RE = re.compile(r"got `(\w+)`")
_PATH_RE = re.compile(r" - at `\$\.(\w+)")


# ----------------------------------------------------------------------------- time helpers


def rfc3339_from_ms(ms: int) -> str:
    """Epoch milliseconds -> `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC). Raises OverflowError outside
    years 0001-9999 (every `TextEvent.ts_ms` is inside)."""
    d = _EPOCH + timedelta(milliseconds=ms)
    # Formatted by hand: strftime('%Y') does not zero-pad years below 1000 on glibc.
    return (
        f"{d.year:04d}-{d.month:02d}-{d.day:02d}T"
        f"{d.hour:02d}:{d.minute:02d}:{d.second:02d}.{d.microsecond // 1000:03d}Z"
    )


def now_rfc3339() -> str:
    """The current UTC time, millisecond precision, 'Z' suffix."""
    return rfc3339_from_ms(time.time_ns() // 1_000_000)


def parse_rfc3339_ms(value: str) -> int | None:
    """An RFC 3339 date-time -> epoch milliseconds (floored), or None if it is not one."""
    if _RFC3339_RE.fullmatch(value) is None:
        return None
    try:
        # upper(): fromisoformat wants 'T' and 'Z'; RFC 3339 also allows 't' and 'z'.
        d = datetime.fromisoformat(value.upper())
    except ValueError:  # a calendar error such as February 30
        return None
    return (d - _EPOCH) // _ONE_MS


# ----------------------------------------------------------------------------- TextEvent


def decode_event(
    raw: bytes | None, *, topic: str, partition: int, offset: int
) -> TextEvent | DecodeError:
    """Decode and validate one Kafka value as a TextEvent v1. Never raises on bad input.

    A missing or null `id` becomes `"<topic>:<partition>:<offset>"`.
    """
    if raw is None:
        return DecodeError(
            ErrorCode.EMPTY_VALUE, "value is null (a tombstone); expected a UTF-8 JSON object"
        )
    if not raw:
        return DecodeError(
            ErrorCode.EMPTY_VALUE, "value is empty (0 bytes); expected a UTF-8 JSON object"
        )
    # msgspec checks UTF-8 only inside the strings it keeps, so check the whole value first;
    # isascii() is a fast scan that spares the full decode for the common all-ASCII case.
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return DecodeError(
                ErrorCode.INVALID_UTF8,
                f"value is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                "expected a UTF-8 JSON object",
            )
    try:
        wire = _EVENT_DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        return _validation_error(raw, str(exc))
    except msgspec.DecodeError as exc:
        return _invalid_json(str(exc))
    except RecursionError:
        return _too_deep()
    return _check_event(wire, topic, partition, offset)


def _check_event(
    wire: _WireEvent, topic: str, partition: int, offset: int
) -> TextEvent | DecodeError:
    text = wire.text
    if len(text) > MAX_TEXT_CHARS:
        return DecodeError(
            ErrorCode.TEXT_TOO_LONG,
            f"field 'text' must be {_EXPECTED['text']}; got {len(text)} characters",
        )
    # isspace() stops at the first non-space character, so it is cheap on real text;
    # it uses the same Unicode whitespace set as the schema's `\S` pattern in Python.
    if not text or text.isspace():
        got = "an empty string" if not text else f"{len(text)} whitespace characters"
        return DecodeError(
            ErrorCode.EMPTY_TEXT,
            f"field 'text' must contain a non-whitespace character; got {got}",
        )

    event_id = wire.id
    if event_id is None:
        event_id = f"{topic}:{partition}:{offset}"
    elif not event_id:
        return DecodeError(
            ErrorCode.EMPTY_ID, f"field 'id' must be {_EXPECTED['id']}; got an empty string"
        )
    elif len(event_id) > MAX_ID_CHARS:
        return DecodeError(
            ErrorCode.ID_TOO_LONG,
            f"field 'id' must be {_EXPECTED['id']}; got {len(event_id)} characters",
        )

    ts = wire.ts
    ts_ms: int | None
    if ts is None:
        ts_ms = None
    elif isinstance(ts, str):
        ts_ms = parse_rfc3339_ms(ts)
        if ts_ms is None or not MIN_TS_MS <= ts_ms <= MAX_TS_MS:
            return _invalid_ts(repr(ts[:40]) + ("..." if len(ts) > 40 else ""))
    else:
        if isinstance(ts, float):
            if not ts.is_integer():
                return _invalid_ts(repr(ts))
            ts = int(ts)
        if not MIN_TS_MS <= ts <= MAX_TS_MS:
            return _invalid_ts(str(ts))
        ts_ms = ts
    return TextEvent(id=event_id, text=text, metadata=wire.metadata, ts_ms=ts_ms)


def _invalid_ts(got: str) -> DecodeError:
    return DecodeError(
        ErrorCode.INVALID_TS,
        f"field 'ts' must be epoch milliseconds (an integer) or an RFC 3339 date-time "
        f"such as 2024-05-01T12:00:00Z, in years 0001-9999; got {got}",
    )


def _invalid_json(msgspec_message: str) -> DecodeError:
    detail = msgspec_message.removeprefix("JSON is malformed: ")
    if detail == "Input data was truncated":
        detail = "input ends early"
    return DecodeError(
        ErrorCode.INVALID_JSON, f"value is not valid JSON ({detail}); expected a JSON object"
    )


def _too_deep() -> DecodeError:
    return DecodeError(
        ErrorCode.INVALID_JSON,
        "value is nested too deeply to decode; expected a JSON object of modest depth",
    )


def _validation_error(raw: bytes, message: str) -> DecodeError:
    """Map a msgspec ValidationError to an ErrorCode (only runs for bad events)."""
    # msgspec validates while it parses, so a type error can be reported before a syntax
    # error later in the value; re-parse untyped so malformed JSON is always invalid_json.
    try:
        _ANY_DECODER.decode(raw)
    except msgspec.ValidationError:
        pass  # well-formed, but e.g. a number too large for a float: reported below
    except msgspec.DecodeError as exc:
        return _invalid_json(str(exc))
    except RecursionError:
        return _too_deep()

    got_match = _GOT_RE.search(message)
    got = _JSON_TYPE_NAMES.get(got_match.group(1), got_match.group(1)) if got_match else None
    path_match = _PATH_RE.search(message)
    if path_match is None:  # the error is about the top-level value
        if "missing required field `text`" in message:
            return DecodeError(
                ErrorCode.MISSING_TEXT,
                f"field 'text' is required: {_EXPECTED['text']}; got no 'text' field",
            )
        return DecodeError(
            ErrorCode.NOT_AN_OBJECT, f"value must be a JSON object; got {got or message}"
        )
    field = path_match.group(1)
    if field == "text" and got == "null":
        return DecodeError(
            ErrorCode.MISSING_TEXT, f"field 'text' is required: {_EXPECTED['text']}; got null"
        )
    expected = _EXPECTED.get(field, "another type")
    if got is None:  # not a type error: "Number out of range - at `$.metadata.x`"
        detail = message[:1].lower() + message[1:]
        if field == "ts":
            return _invalid_ts(detail)
        return DecodeError(
            ErrorCode.INVALID_JSON,
            f"value has a number that does not fit a 64-bit float ({detail}); "
            "expected numbers within the IEEE 754 double range",
        )
    return DecodeError(ErrorCode.WRONG_TYPE, f"field '{field}' must be {expected}; got {got}")


def encode_event(
    text: str,
    *,
    id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    ts: int | str | datetime | None = None,
) -> bytes:
    """Encode a TextEvent v1 value (for producers and tests). Does not validate: consumers
    do that with `decode_event`. A datetime `ts` must be timezone-aware."""
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise ValueError("ts must be timezone-aware")
        ts = rfc3339_from_ms((ts - _EPOCH) // _ONE_MS)
    return _ENCODER.encode(_WireEventOut(text=text, id=id, metadata=metadata, ts=ts))


# ----------------------------------------------------------------------------- Prediction


def encode_prediction(p: Prediction) -> bytes:
    """Prediction -> JSON bytes for `inflow.predictions`."""
    return _ENCODER.encode(p)


def decode_prediction(raw: bytes) -> Prediction | DecodeError:
    """Decode and validate a Prediction v2, or a v1 record (no `task`: a classification with
    384 numbers). Never raises on bad input; every failure has the code `invalid_prediction`."""
    try:
        p = _PREDICTION_DECODER.decode(raw)
    except UnicodeDecodeError as exc:
        return _bad_prediction(f"value is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    except msgspec.DecodeError as exc:  # includes ValidationError
        return _bad_prediction(str(exc))
    except RecursionError:
        return _bad_prediction("value is nested too deeply")

    version = "v1" if p.task is None else PREDICTION_VERSION
    task = p.task or TASK_CLASSIFICATION
    dim = EMBEDDING_DIM if p.task is None else p.embedding_dim
    if p.task is not None and task not in TASKS:
        return _bad_prediction(f"field 'task' must be one of {', '.join(TASKS)}; got {task!r}")
    if p.task is not None and dim is None:
        return _bad_prediction("field 'embedding_dim' is required with 'task'", version)
    if len(p.embedding) != dim:
        return _bad_prediction(
            f"field 'embedding' must hold {dim} numbers; got {len(p.embedding)}", version
        )
    if task == TASK_CLASSIFICATION and (p.label is None or not p.scores):
        return _bad_prediction("a classification needs a 'label' and non-empty 'scores'", version)
    if task == TASK_EMBEDDING and (p.label is not None or p.scores):
        return _bad_prediction("an embedding has 'label' null and 'scores' {}", version)

    if p.text.isspace():
        return _bad_prediction("field 'text' must contain a non-whitespace character")
    if p.event_ts is not None and parse_rfc3339_ms(p.event_ts) is None:
        return _bad_prediction(
            f"field 'event_ts' must be an RFC 3339 date-time or null; got {p.event_ts!r}"
        )
    if parse_rfc3339_ms(p.processed_ts) is None:
        return _bad_prediction(
            f"field 'processed_ts' must be an RFC 3339 date-time; got {p.processed_ts!r}"
        )
    norm = math.hypot(*p.embedding)  # one C call, and exact enough for a 1e-2 check
    if abs(norm - 1.0) > EMBEDDING_NORM_TOLERANCE:
        return _bad_prediction(
            f"field 'embedding' must be L2-normalised ({dim} numbers, norm 1); got norm {norm:.6g}",
            version,
        )
    assert dim is not None
    for n, passage in enumerate(p.passages or ()):
        if len(passage.embedding) != dim or not passage.start < passage.end <= len(p.text):
            return _bad_prediction(
                f"passage {n} must hold {dim} numbers and a span [start, end) of 'text'", version
            )
    return Prediction(
        id=p.id,
        text=p.text,
        label=p.label,
        scores=p.scores,
        embedding=p.embedding,
        model=p.model,
        truncated=p.truncated,
        event_ts=p.event_ts,
        processed_ts=p.processed_ts,
        metadata=p.metadata,
        source=p.source,
        task=task,
        embedding_dim=dim,
        passages=p.passages,
    )


def _bad_prediction(detail: str, version: str = PREDICTION_VERSION) -> DecodeError:
    return DecodeError(ErrorCode.INVALID_PREDICTION, f"invalid Prediction {version}: {detail}")


# ----------------------------------------------------------------------------- dead letters


def dead_letter_headers(
    error: DecodeError,
    *,
    topic: str,
    partition: int,
    offset: int,
    stage: str,
    replay_count: int = 0,
    engine_version: str | None = None,
) -> list[tuple[str, bytes]]:
    """Kafka headers for a dead-lettered record (the value stays the original bytes).

    `replay_count` (the record's own `inflow.replay.count`, see `replay_count`) is kept, so a
    replayed record that dead-letters again still says how often it was replayed.

    Raises ValueError if `error.code` is not an ErrorCode or `stage` not a Stage: both are
    fixed at the call site, so this is a programming error, never a data error.
    """
    code = ErrorCode(error.code)
    stage_ = Stage(stage)
    # One line, bounded: the message is read by people scanning headers.
    message = " ".join(error.message.split())
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."
    if replay_count < 0:
        raise ValueError(f"replay_count must be 0 or more, got {replay_count}")
    headers = [
        (HEADER_ERROR_CODE, code.value.encode()),
        (HEADER_ERROR_MESSAGE, message.encode("utf-8", "replace")),
        (HEADER_ERROR_STAGE, stage_.value.encode()),
        (HEADER_SOURCE_TOPIC, topic.encode("utf-8", "replace")),
        (HEADER_SOURCE_PARTITION, str(partition).encode()),
        (HEADER_SOURCE_OFFSET, str(offset).encode()),
        (HEADER_SCHEMA_VERSION, SCHEMA_VERSION.encode()),
    ]
    if replay_count:
        headers.append((HEADER_REPLAY_COUNT, str(replay_count).encode()))
    if engine_version:
        headers.append((HEADER_ENGINE_VERSION, engine_version.encode("utf-8", "replace")))
    return headers


def replay_count(
    headers: Iterable[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None,
) -> int:
    """A record's `inflow.replay.count` (0 when absent or not 1 to MAX_REPLAY_COUNT_DIGITS
    ASCII digits). Never raises: headers come from whoever produced the record."""
    if not headers:
        return 0
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    count = 0
    for name, value in pairs:
        if name == HEADER_REPLAY_COUNT and value is not None:
            # Only what `inflow dlq replay` writes counts. isdigit() alone also passes '²' and
            # other Unicode digits, which int() refuses, and int() refuses more than 4,300
            # digits; no record is replayed that often, so such a header is noise: 0.
            valid = len(value) <= MAX_REPLAY_COUNT_DIGITS and value.isascii() and value.isdigit()
            count = int(value) if valid else 0  # a repeated name: the last one wins
    return count


def parse_dead_letter_headers(
    headers: Iterable[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None],
) -> dict[str, str]:
    """The `inflow.*` dead-letter headers of a record as text; other headers are dropped.

    Accepts a list of (name, value) pairs (aiokafka) or a mapping (faust). A repeated name
    keeps its last value, the one the dead-letter writer appended.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in DEAD_LETTER_HEADERS and value is not None:
            out[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out
