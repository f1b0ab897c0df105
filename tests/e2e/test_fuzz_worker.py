"""A generated-input run of a real worker on genuine services: every input ends once.

Over 2,000 inputs, generated from one seed (printed; INFLOW_FUZZ_SEED repeats a run, and
INFLOW_FUZZ_INPUTS changes the count): real texts, texts and ids at and past their limits,
large and deeply nested metadata, records near the texts topic's `max.message.bytes` whose
prediction is over the predictions topic's, odd encodings, non-JSON, JSON non-objects,
tombstones and empty values, keyless records, hundreds of headers and huge header values,
odd `inflow.replay.count` headers, and the same event id several times in a row.

Each input is known by its coordinates on the texts topic (partition, offset), which a
prediction carries in `source` and a dead letter in `inflow.source.*`. The test asserts:
- each input ends as exactly one prediction or exactly one dead letter, never both or neither
  (at least once, and the worker never restarts here, so exactly one);
- a dead letter keeps the original key and value, or a declared prefix whose
  `inflow.original.size` / `inflow.original.sha256` match the original; its headers match
  schemas/json/dead_letter_headers.v1.json and its code is the codec's verdict on the input;
- an input the codec accepts is predicted (with its own id and text), or is dead-lettered as
  `prediction_too_large` when it was built to be;
- the worker's /health/live answers 200 throughout and its process stays alive;
- its RSS stays under the steady RSS after a warm-up plus the in-flight ceiling plus a margin;
- the documents under the alias are the predicted ids, each once (counted by the `id` field
  over every index behind the alias).

Also: the index stage finishes, and the worker logs no ERROR of its own (`streams.*`).
Everything found wrong is listed together at the end, each kind of problem with its smallest
inputs, so one run shows every broken promise.

What it found when written (December 2026, seed 20261205): metadata nested about 330 levels
deep or more (which the codec accepts up to ~996) raised RecursionError in the index's JSON
encoder; that escaped `bulk_index` as a "permanent error", so the whole index batch was parked
and nothing more was indexed (fixed: `indexer.actions.encode_action` refuses that document
alone, which the index stage dead-letters). Predictions the codec accepts but Elasticsearch
refuses end on the predictions DLQ as `index_rejected`, which counts as their one end here:
metadata deeper than the flattened field's 32 levels, ids of up to 256 characters that take
more than 512 bytes in UTF-8, a metadata key too long for one term.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from elasticsearch import AsyncElasticsearch
from elasticsearch.helpers import async_scan

from engines.builder.data import sample_texts
from schemas import (
    HEADER_ERROR_CODE,
    HEADER_ORIGINAL_SHA256,
    HEADER_ORIGINAL_SIZE,
    HEADER_REPLAY_COUNT,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    HEADER_TRUNCATED,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    DecodeError,
    ErrorCode,
    Prediction,
    decode_event,
    decode_prediction,
    load_json_schema,
    parse_dead_letter_headers,
    replay_count,
)
from streams.delivery.records import DEFAULT_MAX_MESSAGE_BYTES
from tests.chaos.harness import RssSampler
from tests.e2e.conftest import Names, Worker, WorkerFactory

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

SEED = int(os.environ.get("INFLOW_FUZZ_SEED", "20261205"))
COUNT = int(os.environ.get("INFLOW_FUZZ_INPUTS", "2200"))  # generated inputs, warm-up apart
PARTITIONS = 4
MIB = 1024 * 1024
# The worker's in-flight ceiling (records taken and not answered), kept small here.
CEILING_BYTES = 8 * MIB
# Beyond the steady RSS (taken after a warm-up of every size class, `warm_up_inputs`: the
# engine's arena, the tokenizer on whole 100,000-character texts, 1 MB records) and the
# ceiling, what a worker may hold: Faust's per-partition stream
# buffers and aiokafka's fetch buffers (1 MiB per partition, texts and predictions: 8 MiB),
# the copies a record makes while in flight (decoded text and metadata, the encoded
# prediction, its dead letter, the producer's batch: about 4x a ~1 MB record), and allocator
# slack; and Faust's stream buffers count records, not bytes (512 a partition), so the ten
# near-limit records of the run may all wait there at once (~10 MB, with their copies ~40).
# Two runs peaked 83 and 101 MB over the steady RSS plus the ceiling: 160 leaves room.
MARGIN_MB = 160
# Whole records near the texts topic's limit (Kafka's default, which the topics here keep):
# sized by their metadata; at 1,045,000 bytes and up the prediction (the input's text and
# metadata plus a ~5 KB embedding) is over the predictions topic's limit, at 1,030,000 and
# below it fits. Nothing is generated between, where it depends on the embedding's digits.
TOO_LARGE_FROM = 1_045_000
FITS_UP_TO = 1_030_000
BIG_SIZES = (
    1_000_000,
    FITS_UP_TO,
    TOO_LARGE_FROM,
    1_046_000,
    1_047_000,
    DEFAULT_MAX_MESSAGE_BYTES - 400,
    DEFAULT_MAX_MESSAGE_BYTES - 200,
)

Header = tuple[str, bytes | None]
Coordinates = tuple[int, int]  # (partition, offset) on the texts topic

# Characters for generated texts: (first, last, weight). No surrogates (those come as JSON
# escapes and raw bytes below); controls, noncharacters and private use are in.
CHAR_RANGES = (
    (0x20, 0x7E, 40),  # ASCII
    (0x00, 0x1F, 2),  # controls, NUL included
    (0xA0, 0x17F, 6),  # Latin-1, Latin Extended-A
    (0x300, 0x36F, 3),  # combining marks
    (0x391, 0x3C9, 2),  # Greek
    (0x400, 0x44F, 3),  # Cyrillic
    (0x5D0, 0x5EA, 2),  # Hebrew (RTL)
    (0x600, 0x6FF, 2),  # Arabic (RTL)
    (0x200B, 0x200F, 2),  # zero-width and direction marks
    (0x2028, 0x2029, 1),  # line and paragraph separators
    (0x4E00, 0x9FFF, 5),  # CJK
    (0xE000, 0xF8FF, 1),  # private use
    (0xFFF0, 0xFFFF, 1),  # specials and noncharacters
    (0x1F300, 0x1FAFF, 5),  # emoji (4 bytes in UTF-8)
    (0x10000, 0x10FFFF, 2),  # anywhere in the astral planes
)


@dataclass
class Input:
    n: int
    kind: str
    key: bytes | None
    value: bytes | None
    headers: list[Header] = field(default_factory=list)
    partition: int = 0
    too_large: bool = False  # built so that its prediction is over the predictions topic's limit
    offset: int = -1  # known once produced

    @property
    def coordinates(self) -> Coordinates:
        return self.partition, self.offset

    @property
    def size(self) -> int:
        headers = sum(len(name.encode()) + len(value or b"") for name, value in self.headers)
        return len(self.key or b"") + len(self.value or b"") + headers

    def describe(self) -> str:
        value = self.value if self.value is None else self.value[:160]
        headers = (
            f", {len(self.headers)} headers ({max(len(v or b'') for _, v in self.headers)} B max)"
            if self.headers
            else ""
        )
        return (
            f"input #{self.n} [{self.kind}] partition {self.partition} offset {self.offset}, "
            f"{self.size} B: key={self.key if self.key is None else self.key[:60]!r}"
            f" value={value!r}{'...' if self.value and len(self.value) > 160 else ''}{headers}"
        )


def _json(obj: object, *, ascii_only: bool = False) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only, separators=(",", ":")).encode()


class Inputs:
    """The generated inputs, in production order, from one seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tweets = sample_texts(800, seed=seed % 997)
        self.blocks: list[list[Input]] = []
        self._n = 0

    # ---------------------------------------------------------------------------- building

    def make(
        self,
        kind: str,
        value: bytes | None,
        *,
        event_id: str | None = None,
        key: bytes | str | None = "auto",
        headers: list[Header] | None = None,
        partition: int | None = None,
        too_large: bool = False,
    ) -> Input:
        if key == "auto":
            key = event_id.encode() if event_id is not None else None
        assert not isinstance(key, str)
        self._n += 1
        return Input(
            self._n,
            kind,
            key,
            value,
            headers or [],
            self.rng.randrange(PARTITIONS) if partition is None else partition,
            too_large,
        )

    def add(self, kind: str, value: bytes | None, **options: Any) -> Input:
        made = self.make(kind, value, **options)
        self.blocks.append([made])
        return made

    def text(self, length: int) -> str:
        ranges = [(lo, hi) for lo, hi, _ in CHAR_RANGES]
        weights = [w for _, _, w in CHAR_RANGES]
        chars = []
        for lo, hi in self.rng.choices(ranges, weights, k=length):
            code = self.rng.randint(lo, hi)
            chars.append(chr(code if not 0xD800 <= code <= 0xDFFF else 0xFFFD))
        return "".join(chars)

    def metadata(self, depth: int = 0) -> dict[str, object]:
        rng = self.rng
        out: dict[str, object] = {}
        for _ in range(rng.randint(0, 5)):
            name = rng.choice(["source", "lang", "n", "tags", "score", "user", "", "a.b", "ß"])
            pick = rng.random()
            if pick < 0.2 and depth < 6:
                out[name] = self.metadata(depth + 1)
            elif pick < 0.35:
                out[name] = [rng.randint(-5, 5), self.text(rng.randint(0, 8)), None, True]
            elif pick < 0.5:
                out[name] = rng.choice([0, -1, 2**53, 10**30, -(10**19), 1.5, -0.0, 1e308, 5e-324])
            elif pick < 0.6:
                out[name] = rng.choice([None, True, False])
            else:
                out[name] = self.text(rng.randint(0, 40))
        return out

    def ts(self) -> object:
        return self.rng.choice(
            [
                1_733_000_000_000,
                0,
                -62_135_596_800_000,
                253_402_300_799_999,
                253_402_300_800_000,  # past year 9999: invalid_ts
                1.7e12,
                1.5,
                "2024-05-01T12:00:00Z",
                "2024-05-01t12:00:00.123+02:00",
                "2024-02-30T00:00:00Z",
                "yesterday",
                "",
                True,
                None,
            ]
        )

    def event(
        self, text: object, event_id: object = ..., *, escape: bool | None = None, **extra: object
    ) -> bytes:
        """A JSON object with `text`, `id` (unless left out) and `extra`; non-ASCII characters
        raw in UTF-8 or, with `escape` (by default 30 % of the time), as \\u escapes."""
        body: dict[str, object] = {"text": text}
        if event_id is not ...:
            body["id"] = event_id
        body.update(extra)
        return _json(body, ascii_only=self.rng.random() < 0.3 if escape is None else escape)

    def normal(self) -> Input:
        n = self._n + 1
        extra: dict[str, object] = {}
        if self.rng.random() < 0.4:
            extra["metadata"] = self.metadata()
        if self.rng.random() < 0.3:
            extra["ts"] = self.ts()
        body = {"text": self.rng.choice(self.tweets), "id": f"f-{n}", **extra}
        return self.make("normal", _json(body, ascii_only=self.rng.random() < 0.3))

    # ---------------------------------------------------------------------------- edges

    def edges(self) -> None:
        """The cases each run must hold, once each (their order is shuffled with the rest)."""
        rng, ev = self.rng, self.event
        # Texts at and past MAX_TEXT_CHARS, in 1-, 3- and 4-byte characters.
        for char in ("a", "語", "😀"):
            for length in (MAX_TEXT_CHARS - 1, MAX_TEXT_CHARS, MAX_TEXT_CHARS + 1):
                event_id = f"text-{ord(char):x}-{length}"
                value = ev(char * length, event_id, escape=False)
                self.add("text length", value, event_id=event_id)
        # Escaped: 6 bytes a character, 12 for one outside the BMP (over the topic's limit).
        value = ev("é" * MAX_TEXT_CHARS, "text-escaped-max", escape=True)
        self.add("text length", value, event_id="text-escaped-max")
        words = " ".join(rng.choice(self.tweets) for _ in range(1200))[:MAX_TEXT_CHARS]
        self.add("text length", ev(words, "text-words-max"), event_id="text-words-max")
        self.add("text length", ev(" " * MAX_TEXT_CHARS, "text-spaces"), event_id="text-spaces")
        odd_texts = [
            "",
            " \t\n",
            "\u0085\u00a0\u2028\u3000",
            "\u200b",
            "\x00",
            "\x00\x01\x02\x1f",
            "nul \x00 inside",
            "\u0301" * 50,
            "שלום עולם مرحبا",
            "😀",
            "\uffff\ufffe",
            "\ue000\uf8ff",
            "\U0010ffff",
            "a" * 5000,
        ]
        for i, text in enumerate(odd_texts):
            self.add("odd text", ev(text, f"odd-{i}"), event_id=f"odd-{i}")
        # Ids at and past MAX_ID_CHARS, in 1- to 4-byte characters (Elasticsearch's _id takes
        # 512 bytes), and odd ones.
        for char in ("i", "é", "語", "😀"):
            for length in (MAX_ID_CHARS - 1, MAX_ID_CHARS, MAX_ID_CHARS + 1):
                event_id = char * length
                self.add("id length", ev("an id at its limit", event_id), event_id=event_id)
        self.add("id length", ev("a very long id", "i" * 5000), key=b"long-id")
        odd_ids: list[object] = ["", "x", " ", "a/b?c#d", "\x00id", "_all", "ü", 5, None, [], True]
        for i, odd in enumerate(odd_ids):
            self.add("odd id", ev(f"odd id {i}", odd), key=f"odd-id-{i}".encode())
        # Metadata: deep (Elasticsearch's flattened field takes depth 32, msgspec ~996), large.
        for depth in (1, 8, 31, 32, 33, 64, 500, 996, 997, 1000, 5000):
            deep = '{"k":' * depth + "1" + "}" * depth
            value = (f'{{"text":"deep metadata","id":"deep-{depth}","metadata":{deep}}}').encode()
            self.add("deep metadata", value, event_id=f"deep-{depth}")
        for depth in (33, 200, 996):
            deep = "[" * depth + "1" + "]" * depth
            value = (
                f'{{"text":"deep list","id":"deeplist-{depth}","metadata":{{"k":{deep}}}}}'
            ).encode()
            self.add("deep metadata", value, event_id=f"deeplist-{depth}")
        large: list[tuple[str, dict[str, object]]] = [
            ("many-keys", {f"k{i}": self.text(rng.randint(0, 20)) for i in range(5000)}),
            ("long-value", {"v": "x" * 500_000}),
            ("long-values", {f"v{i}": "y" * 2000 for i in range(100)}),
            ("long-key", {"k" * 40_000: 1}),
            ("mixed", {"n": 10**30, "f": 1e308, "z": -0.0, "l": [[{"a": [None]}]] * 50}),
            ("empty-key", {"": {"": {"": "v"}}}),
        ]
        for name, meta in large:
            event_id = f"meta-{name}"
            self.add(
                "large metadata", ev("metadata test", event_id, metadata=meta), event_id=event_id
            )
        for i, meta_value in enumerate(([1, 2], "str", 7, None, {"x": float("nan")})):
            self.add(
                "odd metadata",
                ev("odd metadata", f"meta-odd-{i}", metadata=meta_value),
                event_id=f"meta-odd-{i}",
            )
        # Whole records near the texts topic's limit.
        for size in BIG_SIZES:
            event_id = f"big-{size}"
            self.add(
                "big",
                self.sized(event_id, size),
                event_id=event_id,
                too_large=size >= TOO_LARGE_FROM,
            )
        self.add("big", b"x" * (DEFAULT_MAX_MESSAGE_BYTES - 200), key=b"big-not-json")
        self.add("big", self.sized("big-bad-utf8", 1_047_000)[:-3] + b'\xff"}', key=b"big-bad-utf8")
        self.add("big", self.sized("big-keyless", 1_046_000), key=None, too_large=True)
        # Encodings.
        body = {"text": "encoded otherwise", "id": "enc"}
        plain = json.dumps(body)
        for i, raw in enumerate(
            [
                plain.encode("utf-16"),
                plain.encode("utf-16-le"),
                plain.encode("utf-16-be"),
                plain.encode("utf-32"),
                "\ufeff".encode() + plain.encode(),
                '{"text":"caf\xe9","id":"enc"}'.encode("latin-1"),
                b'{"text":"overlong \xc0\x80","id":"enc"}',
                b'{"text":"cesu \xed\xa0\x80","id":"enc"}',
                b'{"text":"past U+10FFFF \xf4\x90\x80\x80","id":"enc"}',
                b'{"text":"cut \xe2\x82',
                b'{"text":"lone high \\ud800","id":"enc"}',
                b'{"text":"lone low \\udc00","id":"enc"}',
                b'{"text":"reversed \\ude00\\ud83d","id":"enc"}',
                b'{"text":"escaped pair \\ud83d\\ude00","id":"enc-ok"}',
                b'{"text":"raw nul \x00 byte","id":"enc"}',
                b'{"text":"escaped nul \\u0000","id":"enc-nul"}',
                b'{"text":"x",\x00"id":"enc"}',
                b"\x00",
                b"\x00" * 1000,
                '{"text":"surrogateescape \udcff","id":"enc"}'.encode("utf-8", "surrogateescape"),
                '{"id":"enc","text":"\ud800 in a key"}'.encode("utf-8", "surrogatepass"),
            ]
        ):
            self.add("encoding", raw, key=f"enc-{i}".encode())
        # Not JSON, JSON that is not an object, the wrong shapes.
        shapes: list[bytes] = [
            b"{",
            b'{"text": "unterminated',
            b"text=hello",
            b"<event><text>hi</text></event>",
            b"text,id\nhello,1\n",
            b"NaN",
            b"Infinity",
            b'{"text":"x",}',
            b"{'text':'single quotes'}",
            b'{"text":"x"} // a comment',
            b'{"text":"first","text":"second","id":"dup-key"}',
            b'{"text":"a"}{"text":"b"}',
            b"[]",
            b'[{"text":"in a list"}]',
            b'"text"',
            b"0",
            b"-1.5e3",
            b"true",
            b"false",
            b"null",
            b"{}",
            b'{"text":null}',
            b'{"text":1}',
            b'{"text":["a"]}',
            b'{"text":{"a":1}}',
            b'{"id":"no-text"}',
            b'{"text":"big number","metadata":{"n":1e400}}',
            b'{"text":"ts as bool","ts":true}',
            b'{"text":"ts too big","ts":100000000000000000000}',
            b" ",
            b"\n",
            b"",
            b" \xef\xbb\xbf",
        ]
        for i, raw in enumerate(shapes):
            self.add("shape", raw, key=f"shape-{i}".encode())
        # A tombstone needs a key (the producer refuses a record with neither).
        for i in range(4):
            self.add("tombstone", None, key=f"tomb-{i}".encode() if i % 2 else b"")
        # Keys: empty, not UTF-8, huge, another event's id.
        for i, key in enumerate([b"", b"\xff\xfe", b"k" * 100_000, b"f-1", None]):
            self.add("key", ev(f"key test {i}", f"key-{i}"), key=key)
        # Headers: hundreds, huge values, inflow.replay.count of every odd kind.
        self.add(
            "headers",
            ev("300 headers", "h-300"),
            event_id="h-300",
            headers=[(f"h{i}", self.text(8).encode()) for i in range(300)],
        )
        self.add(
            "headers",
            ev("1000 headers", "h-1000"),
            event_id="h-1000",
            headers=[(f"x-{i % 7}", b"v") for i in range(1000)],
        )
        self.add(
            "headers",
            ev("a 100 KB header", "h-100k"),
            event_id="h-100k",
            headers=[("big", bytes(rng.randrange(256) for _ in range(100_000)))],
        )
        self.add(
            "headers",
            self.sized("h-900k", 900_000)[:-2] + b"}",
            event_id="h-900k-bad",
            headers=[("big", b"z" * 100_000)],
        )
        self.add(
            "headers",
            ev("odd header names", "h-names"),
            event_id="h-names",
            headers=[
                ("ключ", b"v"),
                ("", b"empty name"),
                ("none", None),
                ("inflow.error.code", b"spoofed"),
            ],
        )
        replay_values = [
            b"1",
            b"3",
            b"007",
            b"0",
            b"-1",
            b"",
            b"9" * 18,
            b"9" * 19,
            b"9" * 5000,
            "²".encode(),
            "٣".encode(),
            "१२".encode(),
            b"3 ",
            b"3\x00",
            b"\xff",
            None,
        ]
        for i, count in enumerate(replay_values):
            for valid_input in (True, False):
                event_id = f"replay-{i}-{'ok' if valid_input else 'bad'}"
                value = ev("replayed", event_id) if valid_input else b'{"text": "replayed, cut'
                self.add(
                    "replay header",
                    value,
                    key=event_id.encode(),
                    headers=[(HEADER_REPLAY_COUNT, count)],
                )
        self.add(
            "replay header",
            ev("replayed twice", "replay-repeat"),
            event_id="replay-repeat",
            headers=[(HEADER_REPLAY_COUNT, b"2"), (HEADER_REPLAY_COUNT, b"9" * 5000)],
        )

    def sized(self, event_id: str, size: int) -> bytes:
        """A short text whose metadata pads the encoded event to exactly `size` bytes."""
        base = len(_json({"text": "Short review: works.", "id": event_id, "metadata": {"pad": ""}}))
        value = _json(
            {
                "text": "Short review: works.",
                "id": event_id,
                "metadata": {"pad": "x" * (size - base)},
            }
        )
        assert len(value) == size
        return value

    # ---------------------------------------------------------------------------- random

    def duplicates(self) -> None:
        """The same id several times in a row on one partition (one index batch): sometimes the
        same text, sometimes another, sometimes one of them invalid."""
        n, rng = self._n + 1, self.rng
        event_id, partition = f"dup-{n}", rng.randrange(PARTITIONS)
        block = []
        for j in range(rng.randint(2, 6)):
            text = rng.choice(self.tweets) if rng.random() < 0.5 else f"duplicate {n}"
            value = self.event(text, event_id) if rng.random() < 0.85 else self.event(" ", event_id)
            key = None if j == 1 and rng.random() < 0.3 else event_id.encode()
            block.append(self.make("duplicate id", value, key=key, partition=partition))
        self.blocks.append(block)

    def mutated(self) -> Input:
        """A valid event with one byte changed, inserted, deleted, or the end cut off."""
        rng = self.rng
        raw = bytearray(
            self.event(rng.choice(self.tweets), f"m-{self._n + 1}", metadata=self.metadata())
        )
        at = rng.randrange(len(raw))
        how = rng.randrange(4)
        if how == 0:
            raw[at] = rng.randrange(256)
        elif how == 1:
            raw.insert(at, rng.randrange(256))
        elif how == 2:
            del raw[at]
        else:
            del raw[at:]
        return self.make("mutated", bytes(raw), key=f"m-{self._n + 1}".encode())

    def random_input(self) -> Input | None:
        """One random input, or None when it added a block of its own (duplicate ids)."""
        rng, n = self.rng, self._n + 1
        pick = rng.random()
        if pick < 0.62:
            made = self.normal()
        elif pick < 0.74:
            text = self.text(rng.choice([1, 3, 20, 100, 600]))
            made = self.make("unicode", self.event(text, f"u-{n}"), event_id=f"u-{n}")
        elif pick < 0.80:
            meta = self.metadata()
            for _ in range(rng.randint(0, 40)):
                meta = {"k": meta}
            made = self.make(
                "metadata",
                self.event("random metadata", f"md-{n}", metadata=meta),
                event_id=f"md-{n}",
            )
        elif pick < 0.90:
            made = self.mutated()
        elif pick < 0.95:
            raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
            made = self.make("random bytes", raw, key=f"rb-{n}".encode())
        elif pick < 0.97:
            value = rng.choice([None, b"", b"[]", b"1", b'"s"', b"{}", b'{"text":""}'])
            keyless = rng.random() < 0.5 and value is not None
            made = self.make("empty", value, key=None if keyless else f"e-{n}".encode())
        else:
            self.duplicates()
            return None
        if rng.random() < 0.15:
            made.key = None if rng.random() < 0.8 and made.value is not None else b""
        if rng.random() < 0.03:
            made.headers = [(f"h{i}", self.text(4).encode()) for i in range(rng.randint(100, 400))]
        if rng.random() < 0.04:
            made.headers.append((HEADER_REPLAY_COUNT, str(rng.randint(1, 50)).encode()))
        return made

    def build(self, count: int) -> list[Input]:
        start = self._n
        self.edges()
        while self._n - start < count:
            made = self.random_input()
            if made is not None:
                self.blocks.append([made])
        self.rng.shuffle(self.blocks)
        return [item for block in self.blocks for item in block]


def warm_up_inputs(generated: Inputs) -> list[Input]:
    """Inputs of every size class the run has, before the steady RSS is taken: real texts in
    full batches, texts at MAX_TEXT_CHARS (tokenized whole, then cut to the engine's longest
    sequence), and whole records near the topic's limit, predicted and too large."""
    made = [
        generated.make("warm-up", generated.event(text, f"w-{i}", escape=False), event_id=f"w-{i}")
        for i, text in enumerate(generated.tweets[:48])
    ]
    longest = " ".join(generated.tweets[48:800])
    while len(longest) < MAX_TEXT_CHARS:
        longest += " " + longest
    made += [
        generated.make(
            "warm-up",
            generated.event(longest[i : i + MAX_TEXT_CHARS], f"wl-{i}", escape=False),
            event_id=f"wl-{i}",
        )
        for i in range(16)
    ]
    for size in (FITS_UP_TO, TOO_LARGE_FROM):
        made.append(
            generated.make(
                "warm-up",
                generated.sized(f"wb-{size}", size),
                event_id=f"wb-{size}",
                too_large=size >= TOO_LARGE_FROM,
            )
        )
    return made


def with_offsets(inputs: list[Input]) -> None:
    """The offsets the inputs will get: the topics are new, and one idempotent producer sends
    them one at a time, so each partition counts from 0 in production order."""
    taken: Counter[int] = Counter()
    for item in inputs:
        item.offset = taken[item.partition]
        taken[item.partition] += 1


def colliding_input(generated: Inputs, inputs: list[Input], texts: str) -> Input:
    """An explicit id equal to the id an earlier record without one gets by default
    (`<topic>:<partition>:<offset>`): two predictions, one document."""
    for item in inputs:
        verdict = decode_event(
            item.value, topic=texts, partition=item.partition, offset=item.offset
        )
        if (
            not isinstance(verdict, DecodeError)
            and verdict.id == f"{texts}:{item.partition}:{item.offset}"
        ):
            return generated.make(
                "id collision", generated.event("taken id", verdict.id), key=b"collide"
            )
    raise AssertionError("no input without an id was generated")


# -------------------------------------------------------------------------------- Kafka


async def create_topics(bootstrap: str, names: Names) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, PARTITIONS, 1)
                for name in (names.texts, names.predictions, names.texts_dlq, names.predictions_dlq)
            ]
        )
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, inputs: list[Input]) -> None:
    """One record at a time, to the partition each input names, in order; checks the offsets."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        max_request_size=4 * MIB,
        request_timeout_ms=60_000,
    )
    await producer.start()
    try:
        for item in inputs:
            sent = await producer.send(
                topic,
                key=item.key,
                value=item.value,
                headers=item.headers,
                partition=item.partition,
            )
            meta = await sent
            assert (meta.partition, meta.offset) == item.coordinates, (meta, item.describe())
    finally:
        await producer.stop()


KafkaRecord = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


class TopicReader:
    """Every record of some topics from their beginning, read on as they come."""

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.topics = list(topics)
        self.records: dict[str, list[KafkaRecord]] = {topic: [] for topic in self.topics}
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 * MIB,
            fetch_max_bytes=64 * MIB,
        )

    async def start(self) -> None:
        await self._consumer.start()
        tps = []
        for topic in self.topics:
            for _ in range(100):
                partitions = self._consumer.partitions_for_topic(topic)
                if partitions:
                    break
                await self._consumer._client.force_metadata_update()
                await asyncio.sleep(0.2)
            assert partitions, f"topic {topic} does not exist"
            tps += [TopicPartition(topic, p) for p in partitions]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)

    async def read(self, seconds: float) -> int:
        """Read for `seconds`; how many records came."""
        came = 0
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            batch = await self._consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000) + 1)
            for tp, items in batch.items():
                for item in items:
                    headers = [(name, value or b"") for name, value in item.headers or ()]
                    self.records[tp.topic].append((item.key, item.value, headers))
                    came += 1
        return came

    async def stop(self) -> None:
        await self._consumer.stop()


# -------------------------------------------------------------------------------- watching


class LiveWatch:
    """Polls /health/live and the process on a thread; keeps every answer that was not 200."""

    def __init__(self, worker: Worker, every_s: float = 0.5) -> None:
        self.worker = worker
        self.every_s = every_s
        self.probes = 0
        self.failures: list[tuple[float, object]] = []
        self.exited: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-watch")
        self._started = time.monotonic()

    def __enter__(self) -> LiveWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            code = self.worker.proc.poll()
            if code is not None:
                self.exited = code
                return
            answer = self.worker.probe("/health/live")
            self.probes += 1
            if answer is None or answer[0] != 200:
                self.failures.append((round(time.monotonic() - self._started, 1), answer))


class Problems:
    """What broke, by kind, with the inputs it happened to."""

    def __init__(self) -> None:
        self.found: dict[str, list[tuple[Input | None, str]]] = defaultdict(list)

    def add(self, what: str, item: Input | None, detail: str = "") -> None:
        self.found[what].append((item, detail))

    def report(self) -> str:
        lines = [f"{sum(map(len, self.found.values()))} broken promises (seed {SEED}):"]
        for what, cases in self.found.items():
            lines.append(f"- {what}: {len(cases)}; the smallest:")
            cases = sorted(cases, key=lambda case: case[0].size if case[0] else 0)
            for item, detail in cases[:3]:
                lines.append(f"    {item.describe() if item else '(no input)'}")
                if detail:
                    lines.append(f"      -> {detail[:600]}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------- checks


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_replay(item: Input) -> str | None:
    count = replay_count(item.headers)
    return str(count) if count else None


def check_prediction(
    item: Input,
    prediction: Prediction,
    key: bytes | None,
    headers: list[tuple[str, bytes]],
    texts: str,
    problems: Problems,
) -> None:
    verdict = decode_event(item.value, topic=texts, partition=item.partition, offset=item.offset)
    if isinstance(verdict, DecodeError):
        problems.add(
            "an input the codec refuses was predicted", item, f"{verdict.code}: {verdict.message}"
        )
        return
    if item.too_large:
        problems.add("a prediction over its topic's limit was published", item)
    if prediction.id != verdict.id or key != verdict.id.encode():
        problems.add("a prediction with another id", item, f"id {prediction.id!r}, key {key!r}")
    if prediction.text != verdict.text or prediction.source.topic != texts:
        problems.add("a prediction of another text", item, f"{prediction.text[:80]!r}")
    replay = {name: value for name, value in headers}.get(HEADER_REPLAY_COUNT)
    wanted = expected_replay(item)
    if (replay.decode(errors="replace") if replay is not None else None) != wanted:
        problems.add(
            "a prediction with the wrong replay count", item, f"{replay!r}, wanted {wanted!r}"
        )


def check_dead_letter(
    item: Input,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    texts: str,
    schema: dict[str, Any],
    problems: Problems,
) -> str:
    """Checks one dead letter of `item`; returns its code."""
    parsed = parse_dead_letter_headers(headers)
    try:
        jsonschema.validate(parsed, schema)
    except jsonschema.ValidationError as exc:
        problems.add("dead-letter headers off their schema", item, f"{exc.message}: {parsed}")
    code = parsed.get(HEADER_ERROR_CODE, "")
    if parsed.get(HEADER_SOURCE_TOPIC) != texts:
        problems.add("a dead letter naming another source", item, str(parsed))
    original = item.value
    if parsed.get(HEADER_TRUNCATED) == "true":
        whole = original or b""
        kept = value or b""
        if not (
            parsed.get(HEADER_ORIGINAL_SIZE) == str(len(whole))
            and parsed.get(HEADER_ORIGINAL_SHA256) == sha256(whole)
            and whole.startswith(kept)
            and len(kept) < len(whole)
            and (original is not None or value is None)
            and (item.key or b"").startswith(key or b"")
        ):
            problems.add(
                "a truncated dead letter that is not a declared prefix",
                item,
                f"kept {len(kept)} B, headers {parsed}",
            )
    elif value != original or key != item.key:
        problems.add(
            "a dead letter without the original bytes",
            item,
            f"value {None if value is None else len(value)} B, key {key!r}; {parsed}",
        )
    verdict = decode_event(original, topic=texts, partition=item.partition, offset=item.offset)
    if isinstance(verdict, DecodeError):
        wanted = str(verdict.code)
    elif item.too_large:
        wanted = ErrorCode.PREDICTION_TOO_LARGE.value
    else:
        wanted = "(a prediction)"
    if code != wanted:
        problems.add(
            "a dead letter with another code than the input's",
            item,
            f"{code}: {parsed.get('inflow.error.message')} (wanted {wanted})",
        )
    if parsed.get(HEADER_REPLAY_COUNT) != expected_replay(item):
        problems.add(
            "a dead letter with the wrong replay count",
            item,
            f"{parsed.get(HEADER_REPLAY_COUNT)!r}, wanted {expected_replay(item)!r}",
        )
    return code


async def wait_for_outcomes(
    reader: TopicReader, names: Names, inputs: list[Input], timeout_s: float
) -> None:
    """Read until every input has a prediction or a dead letter (or time is up), then a little
    longer: a second outcome would come now."""
    wanted = {item.coordinates for item in inputs}
    deadline = time.monotonic() + timeout_s
    seen: set[Coordinates] = set()
    counted = {names.predictions: 0, names.texts_dlq: 0}
    while time.monotonic() < deadline:
        await reader.read(1.0)
        for _key, value, _headers in reader.records[names.predictions][
            counted[names.predictions] :
        ]:
            prediction = decode_prediction(value or b"")
            if not isinstance(prediction, DecodeError):
                seen.add((prediction.source.partition, prediction.source.offset))
        for _key, _value, headers in reader.records[names.texts_dlq][counted[names.texts_dlq] :]:
            parsed = parse_dead_letter_headers(headers)
            seen.add(coordinates_of(parsed))
        counted = {topic: len(reader.records[topic]) for topic in counted}
        if wanted <= seen:
            break
    await reader.read(4.0)


def coordinates_of(parsed: dict[str, str]) -> Coordinates:
    try:
        return int(parsed[HEADER_SOURCE_PARTITION]), int(parsed[HEADER_SOURCE_OFFSET])
    except (KeyError, ValueError):
        return -1, -1


async def indexed_ids(es_url: str, alias: str) -> Counter[str]:
    """Documents per `id` over every index behind the alias."""
    async with AsyncElasticsearch(es_url, request_timeout=60) as es:
        await es.indices.refresh(index=alias)
        found: Counter[str] = Counter()
        async for hit in async_scan(es, index=alias, query={"_source": ["id"]}, size=1000):
            found[str(hit["_source"].get("id"))] += 1
        return found


# -------------------------------------------------------------------------------- the test


async def test_generated_inputs_each_end_once_while_the_worker_stays_live_and_bounded(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str
) -> None:
    began = time.monotonic()
    print(f"\nfuzz seed {SEED} (INFLOW_FUZZ_SEED={SEED} repeats this run), {COUNT} inputs")
    generated = Inputs(SEED)
    fuzz = generated.build(COUNT)
    warm = warm_up_inputs(generated)
    with_offsets(warm + fuzz)
    fuzz.append(colliding_input(generated, fuzz, names.texts))
    inputs = warm + fuzz
    with_offsets(inputs)
    schema = load_json_schema("dead_letter_headers")
    problems = Problems()

    await create_topics(kafka_bootstrap, names)
    worker = workers.start(
        INFLOW_TOPIC_PARTITIONS=str(PARTITIONS), INFLOW_MAX_IN_FLIGHT_BYTES=str(CEILING_BYTES)
    )
    reader = TopicReader(
        kafka_bootstrap, [names.predictions, names.texts_dlq, names.predictions_dlq]
    )
    await reader.start()
    try:
        with RssSampler(every_s=0.2) as rss, LiveWatch(worker) as live:
            rss.watch(worker.proc.pid)
            await produce(kafka_bootstrap, names.texts, warm)
            await wait_for_outcomes(reader, names, warm, timeout_s=120)
            settled = time.monotonic()
            await asyncio.sleep(3)
            steady = rss.peak(since=settled)
            fuzz_began = time.monotonic()
            await produce(kafka_bootstrap, names.texts, fuzz)
            produced_s = time.monotonic() - fuzz_began
            await wait_for_outcomes(reader, names, inputs, timeout_s=240)
            answered_s = time.monotonic() - fuzz_began

            predictions: dict[Coordinates, list[tuple[bytes | None, Prediction, Any]]] = (
                defaultdict(list)
            )
            for key, value, headers in reader.records[names.predictions]:
                prediction = decode_prediction(value or b"")
                if isinstance(prediction, DecodeError):
                    problems.add("a prediction that does not decode", None, prediction.message)
                    continue
                where = (prediction.source.partition, prediction.source.offset)
                predictions[where].append((key, prediction, headers))
            predicted_ids = {p.id for found in predictions.values() for _, p, _ in found}

            # The index: every predicted id, or its dead letter on the predictions DLQ.
            deadline = time.monotonic() + 120
            while True:
                indexed = await indexed_ids(es_url, names.alias)
                index_dead = {
                    (key or b"").decode(errors="replace"): parse_dead_letter_headers(headers)
                    for key, _, headers in reader.records[names.predictions_dlq]
                }
                if predicted_ids <= set(indexed) | set(index_dead):
                    index_stuck = None
                    break
                if time.monotonic() > deadline:
                    index_stuck = await asyncio.to_thread(worker.probe, "/health/ready")
                    break
                await reader.read(2.0)
            await asyncio.sleep(2)  # a duplicate document would land now
            indexed = await indexed_ids(es_url, names.alias)
            peak = rss.peak(since=fuzz_began)
    finally:
        await reader.stop()
    stop_code = await asyncio.to_thread(worker.stop, signal.SIGTERM, 60)

    # Each input: exactly one prediction or exactly one dead letter, which keeps its bytes.
    by_coordinates = {item.coordinates: item for item in inputs}
    dead: dict[Coordinates, list[KafkaRecord]] = defaultdict(list)
    for key, value, headers in reader.records[names.texts_dlq]:
        dead[coordinates_of(parse_dead_letter_headers(headers))].append((key, value, headers))
    for where in (set(predictions) | set(dead)) - set(by_coordinates):
        problems.add("an outcome of no input", None, f"partition, offset {where}")
    codes: Counter[str] = Counter()
    truncated = 0
    owner_of: dict[str, Input] = {}
    for item in inputs:
        mine, letters = predictions.get(item.coordinates, []), dead.get(item.coordinates, [])
        if not mine and not letters:
            problems.add("lost: neither a prediction nor a dead letter", item)
        if mine and letters:
            problems.add("both a prediction and a dead letter", item)
        if len(mine) > 1:
            problems.add("predicted more than once without a restart", item, f"{len(mine)} times")
        if len(letters) > 1:
            problems.add("dead-lettered more than once", item, f"{len(letters)} times")
        for key, prediction, headers in mine:
            owner_of.setdefault(prediction.id, item)
            check_prediction(item, prediction, key, headers, names.texts, problems)
        for key, value, headers in letters:
            codes[check_dead_letter(item, key, value, headers, names.texts, schema, problems)] += 1
            truncated += parse_dead_letter_headers(headers).get(HEADER_TRUNCATED) == "true"

    # The index holds the predicted ids, each once across the alias.
    for doc_id, n in indexed.items():
        if n > 1:
            problems.add("an id indexed more than once", owner_of.get(doc_id), f"{doc_id!r}: {n}")
    for doc_id in set(indexed) - predicted_ids:
        problems.add("a document of no prediction", None, repr(doc_id))
    for doc_id in sorted(predicted_ids - set(indexed)):
        letter = index_dead.get(doc_id)
        if letter:  # refused by Elasticsearch: one dead letter of the index stage, its end
            if letter.get(HEADER_ERROR_CODE) != "index_rejected":
                problems.add("an index dead letter of another code", owner_of.get(doc_id))
        else:
            problems.add(
                "predicted, neither indexed nor dead-lettered by the index stage",
                owner_of.get(doc_id),
            )
    if index_stuck is not None:
        problems.add(
            "the index stage did not finish within 120 s",
            None,
            f"{len(predicted_ids - set(indexed) - set(index_dead))} ids still pending; "
            f"/health/ready said {index_stuck}",
        )
    # What the worker itself called an error (Kafka's client logs start-up noise as ERROR).
    errors = [
        line
        for line in worker.log.read_text(errors="replace").splitlines()
        if " ERROR streams." in line
    ]
    for line in errors:
        problems.add("the worker logged an ERROR", None, line)

    # Live throughout, alive, within its memory bound, and a clean stop.
    bound = steady + CEILING_BYTES / MIB + MARGIN_MB
    if live.exited is not None:
        problems.add("the worker exited during the run", None, f"exit code {live.exited}")
    if live.failures:
        problems.add(
            "/health/live did not answer 200", None, f"(seconds, answer): {live.failures[:10]}"
        )
    if peak > bound:
        problems.add(
            "RSS over its bound",
            None,
            f"peak {peak:.0f} MB > {bound:.0f} MB = steady {steady:.0f} + ceiling "
            f"{CEILING_BYTES / MIB:.0f} + margin {MARGIN_MB}",
        )
    if stop_code != 0:
        problems.add("SIGTERM did not stop the worker cleanly", None, f"exit code {stop_code}")

    kinds = Counter(item.kind for item in inputs)
    index_codes = Counter(letter.get(HEADER_ERROR_CODE) for letter in index_dead.values())
    print(
        f"FUZZ seed {SEED}: {len(inputs)} inputs ({len(warm)} warm-up), "
        f"{sum(item.size for item in inputs) / MIB:.1f} MB; kinds {dict(kinds)}\n"
        f"FUZZ produced in {produced_s:.1f}s, every input answered {answered_s:.1f}s after the "
        f"first was sent; predictions {sum(map(len, predictions.values()))} "
        f"({len(predicted_ids)} ids); dead letters {sum(codes.values())} ({truncated} "
        f"truncated) by code {dict(codes.most_common())}\n"
        f"FUZZ index: {sum(indexed.values())} documents, {len(indexed)} ids; predictions DLQ "
        f"{dict(index_codes)}\n"
        f"FUZZ RSS steady {steady:.0f} MB, peak {peak:.0f} MB, bound {bound:.0f} MB; "
        f"/health/live probes {live.probes}, not 200: {len(live.failures)}; stop exit code "
        f"{stop_code}; {time.monotonic() - began:.0f}s in all"
    )
    assert not problems.found, problems.report()
