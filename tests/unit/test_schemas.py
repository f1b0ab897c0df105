"""Wire contracts: the JSON Schema files and the msgspec fast path must agree."""

from __future__ import annotations

import json
import math
import random
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from schemas import (
    DEAD_LETTER_HEADERS,
    EMBEDDING_DIM,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    MAX_TS_MS,
    MIN_TS_MS,
    PREDICTION_VERSION,
    RFC3339_PATTERN,
    SCHEMA_NAMES,
    SCHEMA_VERSION,
    TASK_CLASSIFICATION,
    TASK_EMBEDDING,
    DecodeError,
    ErrorCode,
    ModelRef,
    PassageVector,
    Prediction,
    Source,
    Stage,
    TextEvent,
    dead_letter_headers,
    decode_event,
    decode_prediction,
    encode_event,
    encode_prediction,
    load_json_schema,
    now_rfc3339,
    parse_dead_letter_headers,
    parse_rfc3339_ms,
    replay_count,
    rfc3339_from_ms,
)

TOPIC, PARTITION, OFFSET = "inflow.texts", 2, 41
DEFAULT_ID = f"{TOPIC}:{PARTITION}:{OFFSET}"
MAY_1 = 1_714_564_800_000  # 2024-05-01T12:00:00Z


# ----------------------------------------------------------------------------- helpers

# jsonschema checks `date-time` only with an optional package (not installed), so register a
# checker here; it is written independently of the codec so the two can disagree.
_FORMATS = FormatChecker()


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if isinstance(value, str):
        datetime.fromisoformat(value.upper())
    return True


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load_json_schema(name), format_checker=_FORMATS)


EVENT_VALIDATOR = validator("text_event")


def _reject_constant(name: str) -> None:
    raise ValueError(f"not JSON: {name}")  # Python's json would accept NaN/Infinity


def _has_inf(value: object) -> bool:
    if isinstance(value, float):
        return math.isinf(value)
    if isinstance(value, dict):
        return any(_has_inf(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_inf(v) for v in value)
    return False


def schema_says_valid(raw: bytes | None) -> bool:
    """The verdict of the JSON Schema route: transport rules, UTF-8, JSON, then the schema."""
    if not raw:  # a null or zero-byte Kafka value is not a document at all
        return False
    try:
        instance = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    # Python's json reads 1e400 as inf; the contract wants numbers that fit a double
    # (I-JSON, RFC 7493) in the fields it keeps. Unknown fields are not looked at.
    if isinstance(instance, dict) and _has_inf(instance.get("metadata")):
        return False
    return bool(EVENT_VALIDATOR.is_valid(instance))


def fast(raw: bytes | None) -> TextEvent | DecodeError:
    return decode_event(raw, topic=TOPIC, partition=PARTITION, offset=OFFSET)


def ev(**fields: Any) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()


# ----------------------------------------------------------------------------- event fixtures

# (name, raw value, expected ErrorCode or None for valid)
EVENT_FIXTURES: list[tuple[str, bytes | None, ErrorCode | None]] = [
    ("minimal", b'{"text":"hello"}', None),
    ("with id", ev(id="evt-1", text="hello"), None),
    ("id of 256 chars", ev(id="i" * MAX_ID_CHARS, text="x"), None),
    ("non-ascii id of 256 chars", ev(id="é" * MAX_ID_CHARS, text="x"), None),
    ("with metadata", ev(text="hi", metadata={"lang": "en", "tags": [1, {"a": None}]}), None),
    ("ts as int", ev(text="hi", ts=MAY_1), None),
    ("ts as string", ev(text="hi", ts="2024-05-01T12:00:00Z"), None),
    ("ts with offset and fraction", ev(text="hi", ts="2024-05-01T14:00:00.5+02:00"), None),
    ("ts lower-case t and z", ev(text="hi", ts="2024-05-01t12:00:00z"), None),
    ("ts as integral float", b'{"text":"hi","ts":1.7145648e12}', None),
    ("ts at the limits", ev(text="hi", ts=MAX_TS_MS), None),
    ("optional fields null", ev(id=None, text="hi", metadata=None, ts=None), None),
    ("unknown fields", ev(text="hi", source="app", extra={"deep": [1, 2]}, n=3), None),
    ("unicode text", ev(text="héllo wörld ✓ 🙂"), None),
    ("surrounding whitespace", ev(text="  hi\n"), None),
    ("text of 100000 chars", ev(text="a" * MAX_TEXT_CHARS), None),
    ("text of 100000 non-ascii chars", ev(text="é" * MAX_TEXT_CHARS), None),
    ("invalid JSON", b'{"text": "hi"', ErrorCode.INVALID_JSON),
    ("unquoted key", b"{text: 1}", ErrorCode.INVALID_JSON),
    ("trailing garbage", b'{"text":"hi"} x', ErrorCode.INVALID_JSON),
    ("whitespace value", b"   ", ErrorCode.INVALID_JSON),
    ("NaN literal", b'{"text":"hi","ts":NaN}', ErrorCode.INVALID_JSON),
    ("malformed after a type error", b'{"text": 5, oops', ErrorCode.INVALID_JSON),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"text":"hi"}', ErrorCode.INVALID_JSON),
    (
        "too deep",
        b'{"text":"hi","metadata":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}",
        ErrorCode.INVALID_JSON,
    ),
    ("invalid UTF-8", b'{"text":"\xff\xfe"}', ErrorCode.INVALID_UTF8),
    ("invalid UTF-8 in an unknown field", b'{"text":"hi","x":"\xc3\x28"}', ErrorCode.INVALID_UTF8),
    ("JSON array", b'[{"text":"hi"}]', ErrorCode.NOT_AN_OBJECT),
    ("JSON string scalar", b'"hello"', ErrorCode.NOT_AN_OBJECT),
    ("JSON number", b"42", ErrorCode.NOT_AN_OBJECT),
    ("JSON null", b"null", ErrorCode.NOT_AN_OBJECT),
    ("missing text", ev(id="a"), ErrorCode.MISSING_TEXT),
    ("empty object", b"{}", ErrorCode.MISSING_TEXT),
    ("text null", ev(text=None), ErrorCode.MISSING_TEXT),
    ("text is a number", ev(text=12), ErrorCode.WRONG_TYPE),
    ("text is an array", ev(text=["hi"]), ErrorCode.WRONG_TYPE),
    ("empty text", ev(text=""), ErrorCode.EMPTY_TEXT),
    ("whitespace-only text", ev(text=" \t\r\n "), ErrorCode.EMPTY_TEXT),
    ("unicode whitespace-only text", ev(text="\u00a0\u2003\u3000"), ErrorCode.EMPTY_TEXT),
    ("text of 100001 chars", ev(text="a" * (MAX_TEXT_CHARS + 1)), ErrorCode.TEXT_TOO_LONG),
    ("id of 257 chars", ev(id="i" * (MAX_ID_CHARS + 1), text="x"), ErrorCode.ID_TOO_LONG),
    ("empty id", ev(id="", text="x"), ErrorCode.EMPTY_ID),
    ("id is a number", ev(id=7, text="x"), ErrorCode.WRONG_TYPE),
    ("metadata is an array", ev(text="hi", metadata=[1, 2]), ErrorCode.WRONG_TYPE),
    ("metadata is a string", ev(text="hi", metadata="lang=en"), ErrorCode.WRONG_TYPE),
    ("ts not a date", ev(text="hi", ts="not a date"), ErrorCode.INVALID_TS),
    ("ts without offset", ev(text="hi", ts="2024-05-01T12:00:00"), ErrorCode.INVALID_TS),
    ("ts date only", ev(text="hi", ts="2024-05-01"), ErrorCode.INVALID_TS),
    ("ts with space separator", ev(text="hi", ts="2024-05-01 12:00:00Z"), ErrorCode.INVALID_TS),
    ("ts offset without colon", ev(text="hi", ts="2024-05-01T12:00:00+0200"), ErrorCode.INVALID_TS),
    ("ts February 30", ev(text="hi", ts="2024-02-30T00:00:00Z"), ErrorCode.INVALID_TS),
    ("ts leap second", ev(text="hi", ts="2016-12-31T23:59:60Z"), ErrorCode.INVALID_TS),
    ("ts fractional ms", ev(text="hi", ts=1.5), ErrorCode.INVALID_TS),
    ("ts past year 9999", ev(text="hi", ts=MAX_TS_MS + 1), ErrorCode.INVALID_TS),
    ("ts huge number", b'{"text":"hi","ts":1e400}', ErrorCode.INVALID_TS),
    ("number beyond a double", b'{"text":"hi","metadata":{"x":-1e400}}', ErrorCode.INVALID_JSON),
    ("ts is a boolean", ev(text="hi", ts=True), ErrorCode.WRONG_TYPE),
    ("ts is an object", ev(text="hi", ts={"ms": 1}), ErrorCode.WRONG_TYPE),
    ("zero-byte value", b"", ErrorCode.EMPTY_VALUE),
    ("None (tombstone)", None, ErrorCode.EMPTY_VALUE),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [pytest.param(raw, code, id=name) for name, raw, code in EVENT_FIXTURES],
)
def test_event_fixture_same_verdict_and_code(raw: bytes | None, expected: ErrorCode | None) -> None:
    result = fast(raw)
    assert schema_says_valid(raw) is (expected is None)
    if expected is None:
        assert isinstance(result, TextEvent), result
    else:
        assert isinstance(result, DecodeError)
        assert result.code == expected, result.message
        assert result.message and "\n" not in result.message


def test_decoded_fields() -> None:
    assert fast(b'{"text":"hello"}') == TextEvent(
        id=DEFAULT_ID, text="hello", metadata=None, ts_ms=None
    )
    got = fast(ev(id="e1", text=" hi ", metadata={"k": [1]}, ts="2024-05-01T14:00:00.5+02:00"))
    assert got == TextEvent(id="e1", text=" hi ", metadata={"k": [1]}, ts_ms=MAY_1 + 500)
    assert fast(ev(text="hi", ts=MAY_1, x=1)) == TextEvent(DEFAULT_ID, "hi", None, MAY_1)
    assert fast(ev(id=None, text="hi")) == TextEvent(DEFAULT_ID, "hi", None, None)


def test_error_messages_say_what_is_wrong_and_expected() -> None:
    too_long = fast(ev(text="a" * (MAX_TEXT_CHARS + 1)))
    assert too_long == DecodeError(
        ErrorCode.TEXT_TOO_LONG,
        "field 'text' must be a non-empty string of at most 100000 characters; "
        "got 100001 characters",
    )
    wrong = fast(ev(text=12))
    assert isinstance(wrong, DecodeError)
    assert "'text'" in wrong.message and "got an integer" in wrong.message
    bad_ts = fast(ev(text="hi", ts="yesterday\nnoon"))
    assert isinstance(bad_ts, DecodeError)
    assert "'yesterday\\nnoon'" in bad_ts.message and "RFC 3339" in bad_ts.message
    array = fast(b"[]")
    assert isinstance(array, DecodeError) and array.message.endswith("got an array")


# Values per field, valid and not; None as a key means "field absent".
_ABSENT = object()
_FIELD_POOLS: dict[str, list[Any]] = {
    "id": [_ABSENT, None, "", "a", "x" * 256, "x" * 257, "é" * 256, 5, ["a"], True],
    "text": [
        _ABSENT,
        None,
        "",
        " ",
        "\u3000\n",
        "hi",
        " hi ",
        3,
        ["hi"],
        {"a": 1},
        True,
        "a" * MAX_TEXT_CHARS,
        "a" * (MAX_TEXT_CHARS + 1),
    ],
    "metadata": [_ABSENT, None, {}, {"k": [1, {"x": None}]}, [], "m", 1, False],
    "ts": [
        _ABSENT,
        None,
        0,
        -1,
        MIN_TS_MS,
        MAX_TS_MS,
        MIN_TS_MS - 1,
        MAX_TS_MS + 1,
        1.7e12,
        1.5,
        True,
        "2024-05-01T12:00:00Z",
        "2024-05-01t12:00:00.123456789z",
        "2024-05-01T12:00:00+05:30",
        "2024-02-29T00:00:00Z",
        "2023-02-29T00:00:00Z",
        "2024-05-01T12:00:00",
        "2024-05-01",
        "2024-05-01T24:00:00Z",
        "2024-05-01T23:59:60Z",
        "2024-13-01T00:00:00Z",
        "not a date",
        "",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999Z",
        "2024-05-01T12:00:00Z\n",
        ["2024"],
    ],
    "extra": [_ABSENT, 1, {"nested": [None]}],
}


def test_schema_and_fast_path_agree_on_random_events() -> None:
    rng = random.Random(1234)
    for _ in range(1500):
        fields = {name: rng.choice(pool) for name, pool in _FIELD_POOLS.items()}
        raw = ev(**{k: v for k, v in fields.items() if v is not _ABSENT})
        result = fast(raw)
        assert isinstance(result, TextEvent) is schema_says_valid(raw), (fields, result)


def test_decode_event_never_raises_on_random_bytes() -> None:
    rng = random.Random(99)
    seeds = [raw for _, raw, _ in EVENT_FIXTURES if raw and len(raw) < 1000]
    alphabet = b'{}[]":,0123456789.eE+-tfnrul \\abcxyzT\x00\x7f\x80\xc3\xa9\xff'
    for i in range(2000):
        if i % 3 == 0:  # pure noise
            raw = rng.randbytes(rng.randrange(0, 200))
        elif i % 3 == 1:  # JSON-ish noise
            raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        else:  # a valid-looking event with a few bytes flipped, dropped or cut
            buf = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                pos = rng.randrange(len(buf)) if buf else 0
                op = rng.randrange(3)
                if op == 0 and buf:
                    buf[pos] = rng.randrange(256)
                elif op == 1 and buf:
                    del buf[pos]
                else:
                    del buf[pos:]
            raw = bytes(buf)
        result = fast(raw)
        assert isinstance(result, TextEvent | DecodeError)
        assert isinstance(result, TextEvent) is schema_says_valid(raw), (raw, result)
        if isinstance(result, DecodeError):
            assert result.code in set(ErrorCode) and "\n" not in result.message


def test_encode_event_round_trip() -> None:
    assert encode_event("hi") == b'{"text":"hi"}'
    raw = encode_event("hi", id="e1", metadata={"k": "v"}, ts=MAY_1)
    assert fast(raw) == TextEvent("e1", "hi", {"k": "v"}, MAY_1)
    raw = encode_event("hi", ts=datetime(2024, 5, 1, 12, tzinfo=UTC))
    assert json.loads(raw)["ts"] == "2024-05-01T12:00:00.000Z"
    assert fast(raw) == TextEvent(DEFAULT_ID, "hi", None, MAY_1)
    assert schema_says_valid(raw)
    with pytest.raises(ValueError):
        encode_event("hi", ts=datetime(2024, 5, 1))


# ----------------------------------------------------------------------------- predictions


def make_prediction(**overrides: Any) -> Prediction:
    rng = random.Random(7)
    vec = [rng.gauss(0.0, 1.0) for _ in range(EMBEDDING_DIM)]
    norm = math.sqrt(sum(x * x for x in vec))
    fields: dict[str, Any] = {
        "id": "evt-1",
        "text": "I love this",
        "label": "positive",
        "scores": {"negative": 0.05, "neutral": 0.15, "positive": 0.8},
        "embedding": [x / norm for x in vec],
        "model": ModelRef("minilm-l6-sentiment", "v1-onnxruntime-int8-1a2b", "onnxruntime", "int8"),
        "truncated": False,
        "event_ts": rfc3339_from_ms(MAY_1),
        "processed_ts": rfc3339_from_ms(MAY_1 + 1500),  # fixed: two calls must be equal
        "metadata": {"lang": "en"},
        "source": Source(TOPIC, PARTITION, OFFSET),
    }
    fields.update(overrides)
    return Prediction(**fields)


def test_prediction_round_trip() -> None:
    for p in [make_prediction(), make_prediction(event_ts=None, metadata=None, truncated=True)]:
        assert decode_prediction(encode_prediction(p)) == p


def test_encoded_prediction_validates_against_schema() -> None:
    v = validator("prediction")
    for p in [make_prediction(), make_prediction(event_ts=None, metadata=None)]:
        instance = json.loads(encode_prediction(p))
        assert list(v.iter_errors(instance)) == []
        # Every field is required except passages (null unless INFLOW_PASSAGES_MAX > 1).
        assert set(instance) == {*v.schema["required"], "passages"}
        assert instance["passages"] is None


def test_a_prediction_with_passages_round_trips_and_validates() -> None:
    base = make_prediction()
    window = PassageVector(0, len(base.text), list(base.embedding))
    p = msgspec.structs.replace(base, passages=[window, window])
    assert decode_prediction(encode_prediction(p)) == p
    assert list(validator("prediction").iter_errors(json.loads(encode_prediction(p)))) == []
    # A passage outside the text, or of another width, is refused with the reason.
    for bad in (
        PassageVector(0, len(base.text) + 1, list(base.embedding)),
        PassageVector(0, 1, list(base.embedding[:-1])),
    ):
        raw = encode_prediction(msgspec.structs.replace(base, passages=[bad]))
        result = decode_prediction(raw)
        assert isinstance(result, DecodeError) and "passage 0" in result.message


def _mutated(**changes: Any) -> bytes:
    """A Prediction v1 document (no task, no embedding_dim) with `changes` applied."""
    doc = json.loads(encode_prediction(make_prediction()))
    del doc["task"], doc["embedding_dim"]
    for key, value in changes.items():
        if value is _ABSENT:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "schema_catches"),
    [
        pytest.param(_mutated(label=_ABSENT), True, id="missing label"),
        pytest.param(_mutated(metadata=_ABSENT), True, id="missing metadata"),
        pytest.param(_mutated(embedding=[0.0] * 383 + [1.0, 0.0]), True, id="385 dims"),
        pytest.param(_mutated(embedding=[1.0] + [0.0] * 382), True, id="383 dims"),
        pytest.param(_mutated(embedding=[0.5] * EMBEDDING_DIM), False, id="not normalised"),
        pytest.param(_mutated(scores={"positive": 1.5}), True, id="score above 1"),
        pytest.param(_mutated(scores={}), True, id="no scores"),
        pytest.param(
            _mutated(source={"topic": "t", "partition": -1, "offset": 0}), True, id="partition<0"
        ),
        pytest.param(_mutated(model={"name": "m"}), True, id="model incomplete"),
        pytest.param(_mutated(processed_ts="2024-05-01"), True, id="bad processed_ts"),
        pytest.param(_mutated(event_ts="2024-02-30T00:00:00Z"), True, id="bad event_ts"),
        pytest.param(_mutated(text="   "), True, id="blank text"),
        pytest.param(_mutated(truncated="no"), True, id="truncated not bool"),
        pytest.param(b"[]", True, id="array"),
        pytest.param(b'{"id":"\xff"}', True, id="invalid utf-8"),
        pytest.param(b"{", True, id="invalid json"),
    ],
)
def test_invalid_predictions_rejected(raw: bytes, schema_catches: bool) -> None:
    result = decode_prediction(raw)
    assert isinstance(result, DecodeError)
    assert result.code == ErrorCode.INVALID_PREDICTION and "\n" not in result.message
    try:
        instance = json.loads(raw)
    except ValueError:
        return
    # The norm is the one rule JSON Schema cannot state.
    assert validator("prediction.v1").is_valid(instance) is not schema_catches


def test_v1_prediction_still_decodes_as_a_384_wide_classification() -> None:
    p = make_prediction()
    result = decode_prediction(_mutated())
    assert result == p and result.task == TASK_CLASSIFICATION and result.embedding_dim == 384
    assert validator("prediction.v1").is_valid(json.loads(_mutated()))


def _unit(n: int) -> list[float]:
    rng = random.Random(n)
    vec = [rng.gauss(0.0, 1.0) for _ in range(n)]
    norm = math.sqrt(sum(x * x for x in vec))
    return [x / norm for x in vec]


def test_v2_embedding_prediction_of_any_width_round_trips_and_validates() -> None:
    for width in (8, 768, 1024):
        p = make_prediction(
            label=None,
            scores={},
            embedding=_unit(width),
            task=TASK_EMBEDDING,
            embedding_dim=width,
        )
        raw = encode_prediction(p)
        assert decode_prediction(raw) == p
        assert list(validator("prediction").iter_errors(json.loads(raw))) == []
    classified = make_prediction(embedding=_unit(768), embedding_dim=768)
    assert decode_prediction(encode_prediction(classified)) == classified


def _v2(**changes: Any) -> bytes:
    doc = json.loads(encode_prediction(make_prediction()))
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "schema_catches"),
    [
        pytest.param(_v2(embedding_dim=768), False, id="width differs from embedding_dim"),
        pytest.param(_v2(task="regression"), True, id="unknown task"),
        pytest.param(_v2(embedding_dim=0), True, id="embedding_dim 0"),
        pytest.param(_v2(task="embedding"), True, id="embedding with a label"),
        pytest.param(_v2(label=None), True, id="classification without a label"),
        pytest.param(_v2(scores={}), True, id="classification without scores"),
        pytest.param(_v2(task="embedding", label=None), True, id="embedding with scores"),
    ],
)
def test_invalid_v2_predictions_rejected(raw: bytes, schema_catches: bool) -> None:
    result = decode_prediction(raw)
    assert isinstance(result, DecodeError)
    assert result.code == ErrorCode.INVALID_PREDICTION and "\n" not in result.message
    assert "Prediction v2" in result.message
    # embedding_dim against the embedding's length: JSON Schema cannot state it either.
    assert validator("prediction").is_valid(json.loads(raw)) is not schema_catches


# ----------------------------------------------------------------------------- dead letters


def test_dead_letter_headers_round_trip() -> None:
    error = DecodeError(ErrorCode.INVALID_JSON, "value is not valid JSON\n(input ends early)")
    headers = dead_letter_headers(error, topic=TOPIC, partition=3, offset=42, stage="decode")
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    parsed = parse_dead_letter_headers([("trace-id", b"abc"), *headers])
    assert parsed == {
        "inflow.error.code": "invalid_json",
        "inflow.error.message": "value is not valid JSON (input ends early)",
        "inflow.error.stage": "decode",
        "inflow.source.topic": TOPIC,
        "inflow.source.partition": "3",
        "inflow.source.offset": "42",
        "inflow.schema.version": SCHEMA_VERSION,
    }
    assert parse_dead_letter_headers(dict(headers)) == parsed
    assert list(validator("dead_letter_headers").iter_errors(parsed)) == []


def test_dead_letter_headers_from_every_stage_validate() -> None:
    v = validator("dead_letter_headers")
    for code in ErrorCode:
        for stage in Stage:
            error = DecodeError(code, "x" * 5000)
            headers = dead_letter_headers(error, topic="t", partition=0, offset=0, stage=stage)
            parsed = parse_dead_letter_headers(headers)
            assert v.is_valid(parsed)
            assert len(parsed["inflow.error.message"]) <= 1000


def test_dead_letter_headers_keep_the_replay_count_and_name_the_engine() -> None:
    error = DecodeError(ErrorCode.INDEX_REJECTED, "mapper_parsing_exception")
    headers = dead_letter_headers(
        error, topic="p", partition=1, offset=7, stage="index", replay_count=2, engine_version="v3"
    )
    parsed = parse_dead_letter_headers(headers)
    assert parsed["inflow.replay.count"] == "2"
    assert parsed["inflow.engine.version"] == "v3"
    assert validator("dead_letter_headers").is_valid(parsed)
    assert replay_count(headers) == 2 and replay_count(dict(headers)) == 2
    plain = dead_letter_headers(error, topic="p", partition=1, offset=7, stage="index")
    assert replay_count(plain) == 0 and "inflow.replay.count" not in dict(plain)
    assert replay_count(None) == 0 and replay_count([("inflow.replay.count", b"x")]) == 0
    with pytest.raises(ValueError):
        dead_letter_headers(error, topic="p", partition=1, offset=7, stage="index", replay_count=-1)


def test_dead_letter_headers_reject_unknown_code_or_stage() -> None:
    with pytest.raises(ValueError):
        dead_letter_headers(
            DecodeError("oops", "m"), topic="t", partition=0, offset=0, stage="decode"
        )
    with pytest.raises(ValueError):
        dead_letter_headers(
            DecodeError(ErrorCode.INVALID_JSON, "m"), topic="t", partition=0, offset=0, stage="x"
        )


# ----------------------------------------------------------------------------- contracts, time


def test_schema_files_are_valid_and_consistent() -> None:
    for name in SCHEMA_NAMES:
        schema = load_json_schema(name)
        Draft202012Validator.check_schema(schema)
        version = PREDICTION_VERSION if name == "prediction" else SCHEMA_VERSION
        assert schema["$id"].endswith(f"{name}:{version}") and schema["title"]
        assert load_json_schema(f"{name}.{version}.json") == schema
    old = load_json_schema("prediction.v1")  # still shipped: v1 records are still decoded
    Draft202012Validator.check_schema(old)
    assert old["$id"].endswith("prediction:v1")
    for name in ("text_event", "prediction"):
        assert load_json_schema(name)["$defs"]["date_time"]["pattern"] == RFC3339_PATTERN
    dlq = load_json_schema("dead_letter_headers")["properties"]
    assert set(dlq) == set(DEAD_LETTER_HEADERS)
    assert dlq["inflow.error.code"]["enum"] == [c.value for c in ErrorCode]
    assert dlq["inflow.error.stage"]["enum"] == [s.value for s in Stage]
    with pytest.raises(ValueError):
        load_json_schema("../models")


def test_time_helpers() -> None:
    assert rfc3339_from_ms(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_from_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert rfc3339_from_ms(MIN_TS_MS) == "0001-01-01T00:00:00.000Z"
    assert rfc3339_from_ms(MAX_TS_MS) == "9999-12-31T23:59:59.999Z"
    assert rfc3339_from_ms(MAY_1 + 7) == "2024-05-01T12:00:00.007Z"
    now = now_rfc3339()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now)
    assert parse_rfc3339_ms(now) is not None
    assert parse_rfc3339_ms("2024-05-01T12:00:00.0079Z") == MAY_1 + 7
    assert parse_rfc3339_ms("2024-05-01T12:00:00") is None
