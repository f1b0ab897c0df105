"""`inflow produce`: publish text events from a JSONL or plain-text file (or stdin)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterable, Iterator
from typing import IO

import msgspec
from aiokafka.errors import KafkaError

from schemas import encode_event
from streams.config import Settings
from streams.errors import InflowError
from streams.kafka import producer
from streams.topics import kafka_unavailable


def events_from_lines(lines: Iterable[str], fmt: str) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) per non-empty line. Text lines become events with a fresh id; JSONL lines
    are sent as they are (the worker validates them), keyed by their `id` when they have one."""
    for line in lines:
        stripped = line.rstrip("\n")
        if not stripped.strip():
            continue
        if fmt == "text":
            event_id = uuid.uuid4().hex
            yield event_id.encode(), encode_event(stripped, id=event_id)
            continue
        value = stripped.encode()
        key = None
        try:
            decoded = msgspec.json.decode(value)
        except msgspec.DecodeError:
            decoded = None
        if isinstance(decoded, dict) and isinstance(decoded.get("id"), str):
            key = decoded["id"].encode()
        yield key, value


async def produce(
    settings: Settings, records: Iterable[tuple[bytes | None, bytes]], topic: str
) -> int:
    client = producer(settings)
    try:
        await client.start()
    except BaseException:
        await client.stop()  # a failed start leaves its connections and tasks behind
        raise
    sent = 0
    try:
        pending = []
        for key, value in records:
            pending.append(await client.send(topic, key=key, value=value))
            sent += 1
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
                print(f"\r  {sent} sent", end="", file=sys.stderr, flush=True)
        await asyncio.gather(*pending)
    finally:
        await client.stop()
    if sent >= 1000:
        print(file=sys.stderr)
    return sent


def produce_file(
    settings: Settings, path: str, *, fmt: str, topic: str | None, key: str = "id"
) -> int:
    try:
        stream: IO[str] = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise InflowError(f"cannot read {path}: {exc.strerror}") from None
    try:
        records = events_from_lines(stream, fmt)
        if key == "none":
            records = ((None, value) for _, value in records)
        return asyncio.run(produce(settings, records, topic or settings.texts_topic))
    except (KafkaError, OSError) as exc:
        raise kafka_unavailable(settings, exc) from None
    finally:
        if stream is not sys.stdin:
            stream.close()
