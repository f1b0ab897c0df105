"""`inflow dlq list|show|replay`: look at dead letters and put them back after a fix.

Dead letters are written by the worker's stages (`streams.delivery.infer`,
`streams.delivery.index`) with the headers of `schemas/json/dead_letter_headers.v1.json`; this
module only reads them.

Replay puts a dead letter back on the topic it was read from (`inflow.source.topic`: the input
topic for a decode or infer failure, the predictions topic for a document the index refused)
with its original key and value bytes and `inflow.replay.count` = its own count + 1. The
worker carries that count onto the prediction and onto a dead letter the record becomes
again, so a record that keeps failing is refused once its count reaches `--max-replays`.

Which dead letters were replayed is kept in Kafka, in a companion topic `<dlq topic>.replays`
(one record per replayed dead letter, keyed by its partition and offset, naming where the copy
went): a second `replay` with the same filters replays nothing twice, and `list` shows each
dead letter as pending or replayed. Markers are written after the copies were acknowledged,
so a replay cut short may replay some records again next time; the index is idempotent by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from schemas import (
    HEADER_ENGINE_VERSION,
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_STAGE,
    HEADER_REPLAY_COUNT,
    HEADER_SOURCE_TOPIC,
    ErrorCode,
    Stage,
    now_rfc3339,
    parse_dead_letter_headers,
    parse_rfc3339_ms,
    replay_count,
    rfc3339_from_ms,
)
from streams.cli.records import Record, read_records
from streams.config import Settings
from streams.errors import ConfigError, KafkaUnavailable
from streams.kafka import admin_client, producer

DEFAULT_MAX_REPLAYS = 3
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def replays_topic(dlq_topic: str) -> str:
    """The companion topic that records which dead letters of `dlq_topic` were replayed."""
    return f"{dlq_topic}.replays"


def parse_time(text: str, now_ms: int | None = None) -> int:
    """`--since`/`--until`: RFC 3339, epoch milliseconds, or an age such as 90s, 15m, 2h, 7d."""
    text = text.strip()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if text.isdigit():
        return int(text)
    match = _DURATION_RE.fullmatch(text)
    if match:
        return now - int(float(match.group(1)) * _UNITS_S[match.group(2)] * 1000)
    parsed = parse_rfc3339_ms(text)
    if parsed is None:
        raise ConfigError(
            f"time {text!r}: expected RFC 3339 (2026-11-25T10:00:00Z), epoch milliseconds, "
            "or an age such as 30m, 2h, 7d"
        )
    return parsed


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    info: dict[str, str]  # the inflow.* dead-letter headers

    @classmethod
    def of(cls, record: Record) -> DeadLetter:
        return cls(record, parse_dead_letter_headers(record.headers))

    @property
    def position(self) -> str:
        return self.record.position

    @property
    def code(self) -> str:
        return self.info.get(HEADER_ERROR_CODE, "")

    @property
    def stage(self) -> str:
        return self.info.get(HEADER_ERROR_STAGE, "")

    @property
    def source_topic(self) -> str:
        return self.info.get(HEADER_SOURCE_TOPIC, "")

    @property
    def replay_count(self) -> int:
        return replay_count(self.record.headers)

    @property
    def engine_version(self) -> str | None:
        """The header; for dead letters written before it existed, a prediction's own
        model.version (index stage)."""
        version = self.info.get(HEADER_ENGINE_VERSION)
        if version or self.stage != Stage.INDEX or not self.record.value:
            return version
        try:
            value = msgspec.json.decode(self.record.value)
        except msgspec.DecodeError:
            return None
        model = value.get("model") if isinstance(value, dict) else None
        found = model.get("version") if isinstance(model, dict) else None
        return found if isinstance(found, str) else None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command looks at (every given criterion must hold)."""

    codes: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    engine_versions: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    def __post_init__(self) -> None:
        known_codes = {c.value for c in ErrorCode}
        if unknown := sorted(self.codes - known_codes):
            raise ConfigError(f"unknown error code {unknown[0]!r}: one of {', '.join(known_codes)}")
        known_stages = {s.value for s in Stage}
        if unknown := sorted(self.stages - known_stages):
            raise ConfigError(f"unknown stage {unknown[0]!r}: one of {', '.join(known_stages)}")

    def matches(self, dead: DeadLetter) -> bool:
        ts = dead.record.timestamp_ms
        return (
            (not self.codes or dead.code in self.codes)
            and (not self.stages or dead.stage in self.stages)
            and (not self.engine_versions or dead.engine_version in self.engine_versions)
            and (self.since_ms is None or ts >= self.since_ms)
            and (self.until_ms is None or ts < self.until_ms)
        )


@dataclass(slots=True)
class ReplayPlan:
    """What `replay` does with each selected dead letter (pure: `plan_replay`)."""

    replay: list[DeadLetter] = field(default_factory=list)
    refused: list[DeadLetter] = field(default_factory=list)  # replayed max_replays times
    already: list[DeadLetter] = field(default_factory=list)  # replayed before
    unroutable: list[DeadLetter] = field(default_factory=list)  # no source topic header


def plan_replay(
    dead_letters: Iterable[DeadLetter], replayed: set[str], max_replays: int
) -> ReplayPlan:
    plan = ReplayPlan()
    for dead in dead_letters:
        if dead.position in replayed:
            plan.already.append(dead)
        elif dead.replay_count >= max_replays:
            plan.refused.append(dead)
        elif not dead.source_topic:
            plan.unroutable.append(dead)
        else:
            plan.replay.append(dead)
    return plan


def replay_headers(dead: DeadLetter) -> list[tuple[str, bytes]]:
    """The replayed copy's headers: only its new replay count (the value and key are the
    original bytes; the dead-letter headers stay with the dead letter)."""
    return [(HEADER_REPLAY_COUNT, str(dead.replay_count + 1).encode())]


# --------------------------------------------------------------------------- Kafka


def dlq_topics(settings: Settings, which: str) -> list[str]:
    topics = {"texts": settings.texts_dlq_topic, "predictions": settings.predictions_dlq_topic}
    return list(topics.values()) if which == "all" else [topics[which]]


async def read_dead_letters(
    settings: Settings, topics: Sequence[str], selection: Selection
) -> list[DeadLetter]:
    found: list[DeadLetter] = []
    for topic in topics:
        async for record in read_records(settings, topic, since_ms=selection.since_ms):
            dead = DeadLetter.of(record)
            if selection.matches(dead):
                found.append(dead)
    found.sort(key=lambda d: (d.record.timestamp_ms, d.position))
    return found


async def read_replayed(settings: Settings, topics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Dead-letter position -> its replay marker, from the companion topics."""
    markers: dict[str, dict[str, Any]] = {}
    for topic in topics:
        async for record in read_records(settings, replays_topic(topic)):
            if record.key is None or record.value is None:
                continue
            try:
                marker = json.loads(record.value)
            except ValueError:
                continue
            markers[f"{topic}:{record.key.decode('utf-8', 'replace')}"] = marker
    return markers


async def _ensure_replays_topic(settings: Settings, topic: str) -> None:
    admin = admin_client(settings)
    await admin.start()
    try:
        if topic in set(await admin.list_topics()):
            return
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(
                [NewTopic(topic, num_partitions=1, replication_factor=settings.topic_replication)]
            )
    finally:
        await admin.close()


async def replay(
    settings: Settings, plan: ReplayPlan, to_topic: str | None = None
) -> list[tuple[DeadLetter, str]]:
    """Publish the plan's dead letters back (acks=all), then their markers; returns each with
    the position its copy got."""
    if not plan.replay:
        return []
    for dlq in {d.record.topic for d in plan.replay}:
        await _ensure_replays_topic(settings, replays_topic(dlq))
    sender = producer(settings, acks="all")
    await sender.start()
    try:
        sent: list[tuple[DeadLetter, str]] = []
        futures = []
        for dead in plan.replay:
            target = to_topic or dead.source_topic
            futures.append(
                await sender.send(
                    target,
                    key=dead.record.key,
                    value=dead.record.value,
                    headers=replay_headers(dead),
                )
            )
        for dead, metadata in zip(plan.replay, await asyncio.gather(*futures), strict=True):
            sent.append((dead, f"{metadata.topic}:{metadata.partition}:{metadata.offset}"))
        markers = []
        for dead, copy in sent:
            marker = {"to": copy, "replay_count": dead.replay_count + 1, "at": now_rfc3339()}
            markers.append(
                await sender.send(
                    replays_topic(dead.record.topic),
                    key=f"{dead.record.partition}:{dead.record.offset}".encode(),
                    value=json.dumps(marker).encode(),
                )
            )
        await asyncio.gather(*markers)
        return sent
    except KafkaError as exc:
        raise KafkaUnavailable(f"replay: {type(exc).__name__}: {exc}") from exc
    finally:
        await sender.stop()


# --------------------------------------------------------------------------- commands


def _line(dead: DeadLetter, marker: dict[str, Any] | None) -> str:
    key = (dead.record.key or b"").decode("utf-8", "replace")[:40] or "-"
    state = f"replayed->{marker['to']}" if marker else "pending"
    message = dead.info.get(HEADER_ERROR_MESSAGE, "")[:80]
    return (
        f"{rfc3339_from_ms(dead.record.timestamp_ms)}  {dead.position}  {dead.code}  "
        f"{dead.stage}  key={key}  engine={dead.engine_version or '-'}  "
        f"replays={dead.replay_count}  {state}  {message}"
    )


def _as_json(dead: DeadLetter, marker: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "position": dead.position,
        "time": rfc3339_from_ms(dead.record.timestamp_ms),
        "key": None if dead.record.key is None else dead.record.key.decode("utf-8", "replace"),
        "code": dead.code,
        "stage": dead.stage,
        "source_topic": dead.source_topic,
        "engine_version": dead.engine_version,
        "replay_count": dead.replay_count,
        "replayed_to": marker["to"] if marker else None,
        "headers": dead.info,
    }


def run_list(
    settings: Settings, which: str, selection: Selection, *, limit: int, as_json: bool
) -> int:
    topics = dlq_topics(settings, which)

    async def go() -> tuple[list[DeadLetter], dict[str, dict[str, Any]]]:
        return await read_dead_letters(settings, topics, selection), await read_replayed(
            settings, topics
        )

    found, markers = asyncio.run(go())
    if as_json:
        print(json.dumps([_as_json(d, markers.get(d.position)) for d in found], indent=1))
        return 0
    for dead in found[-limit:] if limit else found:
        print(_line(dead, markers.get(dead.position)))
    counts: dict[tuple[str, str], int] = {}
    for dead in found:
        counts[dead.code, dead.stage] = counts.get((dead.code, dead.stage), 0) + 1
    pending = sum(1 for d in found if d.position not in markers)
    summary = ", ".join(f"{code}/{stage} {n}" for (code, stage), n in sorted(counts.items()))
    shown = f" (the last {limit} shown)" if limit and len(found) > limit else ""
    print(
        f"{len(found)} dead letters{shown}, {pending} pending: {summary or 'none'}",
        file=sys.stderr,
    )
    return 0


def run_show(settings: Settings, position: str, *, max_bytes: int) -> int:
    topic, _, rest = position.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if not topic or not partition.isdigit() or not rest.isdigit():
        raise ConfigError(f"position {position!r}: expected TOPIC:PARTITION:OFFSET (dlq list)")

    async def go() -> tuple[DeadLetter | None, dict[str, dict[str, Any]]]:
        async for record in read_records(
            settings, topic, start_offsets={int(partition): int(rest)}
        ):
            if record.partition == int(partition) and record.offset == int(rest):
                return DeadLetter.of(record), await read_replayed(settings, [topic])
        return None, {}

    dead, markers = asyncio.run(go())
    if dead is None:
        raise ConfigError(f"no record at {position}")
    for name, value in _as_json(dead, markers.get(dead.position)).items():
        if name != "headers":
            print(f"{name}: {value}")
    for name, value in dead.record.headers:
        print(f"header {name}: {value.decode('utf-8', 'replace')}")
    raw = dead.record.value
    if raw is None:
        print("value: null (a tombstone)")
    else:
        text = raw[:max_bytes].decode("utf-8", "replace")
        more = f" ... ({len(raw)} bytes)" if len(raw) > max_bytes else ""
        print(f"value: {text}{more}")
    return 0


def run_replay(
    settings: Settings,
    which: str,
    selection: Selection,
    *,
    max_replays: int,
    to_topic: str | None,
    dry_run: bool,
) -> int:
    if max_replays < 1:
        raise ConfigError("--max-replays must be at least 1")
    topics = dlq_topics(settings, which)

    async def go() -> ReplayPlan:
        found = await read_dead_letters(settings, topics, selection)
        replayed = set(await read_replayed(settings, topics))
        plan = plan_replay(found, replayed, max_replays)
        if not dry_run:
            await replay(settings, plan, to_topic)
        return plan

    plan = asyncio.run(go())
    targets: dict[str, int] = {}
    for dead in plan.replay:
        target = to_topic or dead.source_topic
        targets[target] = targets.get(target, 0) + 1
    where = ", ".join(f"{n} to {t}" for t, n in sorted(targets.items())) or "nothing"
    verb = "would replay" if dry_run else "replayed"
    print(f"{verb} {len(plan.replay)} ({where})")
    if plan.already:
        print(f"skipped {len(plan.already)} already replayed")
    if plan.refused:
        print(
            f"refused {len(plan.refused)} replayed {max_replays} times already "
            f"(--max-replays): {', '.join(d.position for d in plan.refused[:5])}"
            + (" ..." if len(plan.refused) > 5 else "")
        )
    if plan.unroutable:
        print(f"skipped {len(plan.unroutable)} without an inflow.source.topic header")
    return 0
