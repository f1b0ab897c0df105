"""Properties of the decode path (Hypothesis): whatever the bytes, a value, never an exception.

`decode_event` faces whatever producers write and `replay_count` whatever headers they send;
an exception out of either would stop the agent that calls it (robinhood/faust#586). The
example-based fixtures live in `test_schemas.py`; here the inputs are generated, with weight on
the edges: the size limits, deep nesting, odd encodings and numbers no machine type holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas import (
    HEADER_REPLAY_COUNT,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    MAX_TS_MS,
    MIN_TS_MS,
    DecodeError,
    ErrorCode,
    TextEvent,
    encode_event,
    replay_count,
    rfc3339_from_ms,
)
from schemas.codec import MAX_REPLAY_COUNT_DIGITS
from tests.unit.test_schemas import DEFAULT_ID, EVENT_FIXTURES, fast, schema_says_valid

# No example database: it would be written into the work tree (.hypothesis/), and a failure
# prints its own reproducing example anyway.
FAST = settings(max_examples=200, deadline=None, database=None)
MANY = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _check(result: object) -> TextEvent | DecodeError:
    """What every decode must give: an event within the contract, or a coded one-line error."""
    assert isinstance(result, TextEvent | DecodeError), result
    if isinstance(result, DecodeError):
        assert result.code in set(ErrorCode), result
        assert result.message and "\n" not in result.message, result
        return result
    assert 1 <= len(result.text) <= MAX_TEXT_CHARS and not result.text.isspace()
    assert 1 <= len(result.id) <= MAX_ID_CHARS
    assert result.metadata is None or isinstance(result.metadata, dict)
    assert result.ts_ms is None or MIN_TS_MS <= result.ts_ms <= MAX_TS_MS
    # Everything kept can be written back as UTF-8 (a lone surrogate could not).
    result.text.encode("utf-8")
    result.id.encode("utf-8")
    json.dumps(result.metadata, ensure_ascii=False).encode("utf-8")
    return result


# ----------------------------------------------------------------------------- raw bytes

_SEEDS = [raw for _, raw, _ in EVENT_FIXTURES if raw and len(raw) < 1000]
# Pieces of JSON and of the ways it goes wrong, joined in random order.
_TOKENS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b'"',
    b'"text"',
    b'"id"',
    b'"ts"',
    b'"metadata"',
    b'"hi"',
    b"null",
    b"true",
    b"-0",
    b"1.5e3",
    b"1e400",
    b"-1e400",
    b"9" * 30,
    b"9" * 5000,  # over int()'s 4,300-digit limit
    b"NaN",
    b"\\u0000",
    b"\\ud800",  # an escaped lone surrogate
    b"\\udc00\\ud800",
    b"\\ud83d\\ude00",
    b"\\",
    b"\x00",
    b"\xef\xbb\xbf",  # UTF-8 BOM
    b"\xff\xfe",  # UTF-16 BOM
    b"\xc3\xa9",
    b"\xc3",
    b"\xed\xa0\x80",  # a surrogate encoded as UTF-8: not UTF-8
    b" ",
    b"\t\n",
]


@st.composite
def _mutated_seed(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        op = draw(st.integers(0, 3))
        if op == 0 and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif op == 1 and buf:
            del buf[pos]
        elif op == 2:
            buf[pos:pos] = draw(st.sampled_from(_TOKENS))
        else:
            del buf[pos:]
    return bytes(buf)


RAW_BYTES = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(_TOKENS), max_size=40).map(b"".join),
    _mutated_seed(),
)


@MANY
@given(RAW_BYTES)
@example(b"")
@example(b'{"text":"\\ud800"}')
@example(b'{"text":"hi","ts":' + b"9" * 5000 + b"}")
@example(b'{"text":"hi","id":' + b"9" * 5000 + b"}")
@example(b"[" * 100_000)
def test_decode_event_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    _check(fast(raw))


# ----------------------------------------------------------------------------- near the limits

_TEXT_CHARS = st.sampled_from(["a", "é", "🙂", " ", "\u3000", "\x00", "\u2028"])
_AROUND = st.integers(-2, 2)


@st.composite
def _limit_event(draw: st.DrawFn) -> tuple[bytes, ErrorCode | None]:
    """A JSON event near one of the limits, and the code it must get (None: accepted)."""
    fields: dict[str, Any] = {}
    expected: ErrorCode | None = None
    n = MAX_TEXT_CHARS + draw(_AROUND) if draw(st.booleans()) else draw(st.integers(1, 50))
    char = draw(_TEXT_CHARS)
    text = "x" + char * (n - 1)  # never whitespace-only: that has its own code
    fields["text"] = text
    if len(text) > MAX_TEXT_CHARS:
        expected = ErrorCode.TEXT_TOO_LONG
    if draw(st.booleans()):
        m = MAX_ID_CHARS + draw(_AROUND)
        fields["id"] = draw(st.sampled_from(["i", "é", "🙂"])) * m
        if expected is None and m > MAX_ID_CHARS:
            expected = ErrorCode.ID_TOO_LONG
    if draw(st.booleans()):
        keys = draw(st.sampled_from([0, 1, 1000, 20_000]))
        fields["metadata"] = {f"k{i}": i for i in range(keys)}
    if draw(st.booleans()):
        ts = draw(st.sampled_from([MIN_TS_MS - 1, MIN_TS_MS, MAX_TS_MS, MAX_TS_MS + 1]))
        in_range = min(max(MIN_TS_MS, ts), MAX_TS_MS)  # a string names only years 0001-9999
        fields["ts"] = draw(st.sampled_from([ts, rfc3339_from_ms(in_range)]))
        if expected is None and not MIN_TS_MS <= ts <= MAX_TS_MS and isinstance(fields["ts"], int):
            expected = ErrorCode.INVALID_TS
    ascii_only = draw(st.booleans())  # \uXXXX escapes, astral characters as surrogate pairs
    return json.dumps(fields, ensure_ascii=ascii_only).encode(), expected


@settings(FAST, max_examples=100)  # each builds texts of ~100,000 characters
@given(_limit_event())
def test_events_near_the_size_limits_get_their_code(case: tuple[bytes, ErrorCode | None]) -> None:
    raw, expected = case
    result = _check(fast(raw))
    if expected is None:
        assert isinstance(result, TextEvent), result
    else:
        assert isinstance(result, DecodeError) and result.code == expected, result


_SPOILERS = {
    # name: (how the bytes are spoiled, the codes it may get)
    "bom": (lambda raw: b"\xef\xbb\xbf" + raw, {ErrorCode.INVALID_JSON}),
    "utf16": (
        lambda raw: raw.decode().encode("utf-16"),
        {ErrorCode.INVALID_UTF8, ErrorCode.INVALID_JSON},
    ),
    "utf16le": (
        lambda raw: raw.decode().encode("utf-16-le"),
        {ErrorCode.INVALID_UTF8, ErrorCode.INVALID_JSON},
    ),
    "utf32": (
        lambda raw: raw.decode().encode("utf-32"),
        {ErrorCode.INVALID_UTF8, ErrorCode.INVALID_JSON},
    ),
    "lone surrogate": (
        lambda raw: raw.replace(b'"text": "', b'"text": "\\ud800', 1),
        {ErrorCode.INVALID_JSON},
    ),
    "surrogate as utf-8": (
        lambda raw: raw.replace(b'"text": "', b'"text": "\xed\xa0\x80', 1),
        {ErrorCode.INVALID_UTF8},
    ),
    "raw nul": (
        lambda raw: raw.replace(b'"text": "', b'"text": "\x00', 1),
        {ErrorCode.INVALID_JSON},
    ),
}


@FAST
@given(
    st.text(min_size=1, max_size=40).filter(lambda t: not t.isspace()),
    st.sampled_from(sorted(_SPOILERS)),
)
def test_odd_encodings_are_refused_with_a_code(text: str, spoiler: str) -> None:
    raw = json.dumps({"text": text}, ensure_ascii=False).encode()
    spoil, codes = _SPOILERS[spoiler]
    result = _check(fast(spoil(raw)))
    assert isinstance(result, DecodeError) and result.code in codes, (spoiler, result)


@FAST
@given(
    st.sampled_from([1, 10, 100, 500, 900, 1000, 1100, 5000, 100_000]),
    st.sampled_from(["[", '{"a":']),
)
def test_deep_nesting_is_a_value_not_a_crash(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    for raw in (f'{{"text":"hi","metadata":{{"m":{nested}}}}}', f'{{"text":"hi","x":{nested}}}'):
        result = _check(fast(raw.encode()))
        if depth <= 100:  # well within any recursion limit: accepted
            assert isinstance(result, TextEvent), result
        elif depth >= 5000:  # past Python's: refused, not raised
            assert isinstance(result, DecodeError) and result.code == ErrorCode.INVALID_JSON


_HUGE_NUMBERS = ["1e400", "-1e400", "9" * 30, "-" + "9" * 400, "9" * 4300, "9" * 5000]


@FAST
@given(
    st.sampled_from([*_HUGE_NUMBERS, "1e-400"]),  # the last one underflows to 0: a valid ts
    st.sampled_from(["ts", "id", "text", "metadata", "x"]),
)
def test_numbers_no_machine_type_holds_are_values_not_crashes(number: str, field: str) -> None:
    value = f'{{"n":{number}}}' if field == "metadata" else number
    raw = f'{{"text":"hi","{field}":{value}}}'.replace('"text":"hi","text":', '"text":')
    result = _check(fast(raw.encode()))
    if field in ("id", "text") or (field == "ts" and number in _HUGE_NUMBERS):
        assert isinstance(result, DecodeError), result


# ----------------------------------------------------------------------------- schema agreement

_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_FIELD = st.one_of(
    JSON_VALUES,
    st.text(max_size=30),
    st.integers(MIN_TS_MS - 2, MAX_TS_MS + 2),
    st.integers(MIN_TS_MS, MAX_TS_MS).map(rfc3339_from_ms),
)


@FAST
@given(
    st.dictionaries(st.sampled_from(["text", "id", "metadata", "ts", "other"]), _FIELD, max_size=5),
    st.booleans(),
)
def test_the_fast_path_and_the_json_schema_agree(fields: dict[str, Any], ascii_only: bool) -> None:
    raw = json.dumps(fields, ensure_ascii=ascii_only).encode()
    result = _check(fast(raw))
    assert isinstance(result, TextEvent) is schema_says_valid(raw), (fields, result)


# ----------------------------------------------------------------------------- round trip

_TEXTS = st.text(min_size=1, max_size=300).filter(lambda t: not t.isspace())
_METADATA = st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6)


@FAST
@given(
    _TEXTS,
    st.none() | st.text(min_size=1, max_size=MAX_ID_CHARS),
    st.none() | _METADATA,
    st.none() | st.integers(MIN_TS_MS, MAX_TS_MS),
    st.booleans(),
)
def test_a_valid_event_round_trips(
    text: str, id: str | None, metadata: dict[str, Any] | None, ts: int | None, as_text: bool
) -> None:
    wire_ts: int | str | None = rfc3339_from_ms(ts) if ts is not None and as_text else ts
    result = fast(encode_event(text, id=id, metadata=metadata, ts=wire_ts))
    assert result == TextEvent(id if id is not None else DEFAULT_ID, text, metadata, ts)


def test_events_exactly_at_the_limits_round_trip() -> None:
    for char in ("a", "é", "🙂"):
        text, id = char * MAX_TEXT_CHARS, char * MAX_ID_CHARS
        result = fast(encode_event(text, id=id, ts=MAX_TS_MS))
        assert result == TextEvent(id, text, None, MAX_TS_MS)


# ----------------------------------------------------------------------------- replay_count

_COUNT_RE = re.compile(f"[0-9]{{1,{MAX_REPLAY_COUNT_DIGITS}}}")
_ODD_VALUES = [
    "²",  # isdigit() is True, int() refuses it
    "٣",  # an Arabic-Indic 3: isdigit() is True, int() would read it
    "0",
    "007",
    "9" * MAX_REPLAY_COUNT_DIGITS,
    "9" * (MAX_REPLAY_COUNT_DIGITS + 1),
    "9" * 4300,
    "9" * 4301,  # over int()'s limit
    "1" * 100_000,
    " 3",
    "3\n",
    "-1",
    "+1",
    "1e3",
    "",
]
_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.text(max_size=40),
    st.text(alphabet="0123456789²³¹٣۳߃०", max_size=25),
    st.sampled_from(_ODD_VALUES),
    st.sampled_from(_ODD_VALUES).map(lambda v: v.encode("utf-8")),
)
_NAMES = st.one_of(
    st.sampled_from([HEADER_REPLAY_COUNT, "inflow.error.code"]), st.text(max_size=30)
)
HEADERS = st.lists(st.tuples(_NAMES, _VALUES), max_size=20)


def _expected_count(pairs: list[tuple[str, bytes | str | None]]) -> int:
    """The documented rule, written apart from the code: the last replay header counts when
    it is 1 to MAX_REPLAY_COUNT_DIGITS ASCII digits, else 0."""
    values = [v for name, v in pairs if name == HEADER_REPLAY_COUNT and v is not None]
    if not values:
        return 0
    last = values[-1]
    text = last.decode("latin-1") if isinstance(last, bytes) else last
    return int(text) if _COUNT_RE.fullmatch(text) else 0


@settings(FAST, max_examples=400)
@given(HEADERS)
@example([(HEADER_REPLAY_COUNT, "²")])
@example([(HEADER_REPLAY_COUNT, "9" * 5000)])
@example([(HEADER_REPLAY_COUNT, b"9" * 5000)])
@example([(HEADER_REPLAY_COUNT, "3"), (HEADER_REPLAY_COUNT, None)])
@example([(HEADER_REPLAY_COUNT, "x" * 1_000_000)] * 50)
@example([(f"h{i}", b"v" * 1000) for i in range(5000)] + [(HEADER_REPLAY_COUNT, b"12")])
def test_replay_count_never_raises_and_is_a_count(
    headers: list[tuple[str, bytes | str | None]],
) -> None:
    count = replay_count(headers)
    assert isinstance(count, int) and count >= 0
    assert count == _expected_count(headers)
    as_mapping: Mapping[str, bytes | str | None] = dict(headers)
    assert replay_count(as_mapping) == _expected_count(list(as_mapping.items()))


def test_replay_count_reads_what_replay_writes() -> None:
    for n in (1, 2, 10, 10**MAX_REPLAY_COUNT_DIGITS - 1):
        assert replay_count([(HEADER_REPLAY_COUNT, str(n).encode())]) == n
    assert replay_count([(HEADER_REPLAY_COUNT, "²")]) == 0
    assert replay_count([(HEADER_REPLAY_COUNT, "9" * 4301)]) == 0
    assert replay_count(None) == 0 and replay_count([]) == 0 and replay_count({}) == 0
