"""Bench traffic: events into Kafka (a backlog, or paced load), predictions' timestamps out."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable

import msgspec

from streams.cli.bench.progress import progress
from streams.config import Settings


def event_bytes(i: int, text: str, run: str) -> tuple[bytes, bytes]:
    key = f"{run}-{i}"
    return key.encode(), msgspec.json.encode(
        {"id": key, "text": text, "ts": int(time.time() * 1000)}
    )


async def create_topics(settings: Settings, names: list[str], partitions: int) -> None:
    from aiokafka.admin import NewTopic

    from streams.kafka import admin_client

    admin = admin_client(settings)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, partitions, settings.topic_replication) for n in names]
        )
    finally:
        await admin.close()


async def produce_backlog(settings: Settings, topic: str, texts: list[str], run: str) -> None:
    from aiokafka import AIOKafkaProducer

    from streams.kafka import client_options

    bar = progress(len(texts), f"backlog {topic}")
    prod = AIOKafkaProducer(**client_options(settings), linger_ms=20, max_batch_size=256 * 1024)
    await prod.start()
    try:
        pending = []
        for i, text in enumerate(texts):
            key, value = event_bytes(i, text, run)
            pending.append(await prod.send(topic, value, key=key))
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                bar.update(len(pending))
                pending = []
        await asyncio.gather(*pending)
        bar.update(len(pending))
    finally:
        await prod.stop()
        bar.close()


async def _first_timestamps(
    settings: Settings,
    topic: str,
    wanted: Callable[[bytes], bool],
    expected: int,
    desc: str,
    timeout_s: float,
) -> dict[bytes, int]:
    """Read `topic` from the start until `expected` distinct wanted keys arrived (or the
    timeout passed): key -> the record timestamp (ms) of its first record."""
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import client_options

    consumer = AIOKafkaConsumer(
        topic,
        **client_options(settings),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    seen: dict[bytes, int] = {}
    bar = progress(expected, desc)
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batches.values():
                for record in records:
                    key = record.key
                    if key is not None and key not in seen and wanted(key):
                        seen[key] = record.timestamp
                        bar.update(1)
    finally:
        bar.close()
        await consumer.stop()
    return seen


async def collect(
    settings: Settings, topic: str, expected: int, desc: str, timeout_s: float
) -> dict[bytes, int]:
    """Read `topic` from the start until `expected` distinct keys arrived: key -> record ms."""
    seen = await _first_timestamps(settings, topic, lambda _key: True, expected, desc, timeout_s)
    if len(seen) < expected:
        raise RuntimeError(
            f"{desc}: {len(seen)} of {expected} predictions within {timeout_s:.0f} s"
        )
    return seen


async def offer_load(
    settings: Settings, topic: str, texts: list[str], rate: float, run: str
) -> dict[bytes, float]:
    """Send `texts` at `rate` events/s; returns key -> send time (epoch ms)."""
    from aiokafka import AIOKafkaProducer

    from streams.kafka import client_options

    prod = AIOKafkaProducer(**client_options(settings), linger_ms=0)
    await prod.start()
    sent: dict[bytes, float] = {}
    bar = progress(len(texts), f"offer {rate:.0f}/s")
    try:
        started = time.perf_counter()
        futures = []
        for i, text in enumerate(texts):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key, value = event_bytes(i, text, run)
            sent[key] = time.time() * 1000
            futures.append(await prod.send(topic, value, key=key))
            bar.update(1)
        await asyncio.gather(*futures)
    finally:
        bar.close()
        await prod.stop()
    return sent


async def collect_keys(
    settings: Settings, topic: str, keys: set[bytes], desc: str
) -> dict[bytes, int]:
    """Record timestamps (ms) of the predictions for `keys` (the topic holds older ones too)."""
    got = await _first_timestamps(settings, topic, keys.__contains__, len(keys), desc, 600)
    if len(got) < len(keys):
        raise RuntimeError(f"{desc}: {len(got)} of {len(keys)} predictions arrived")
    return got


def wait_indexed(settings: Settings, expected: int, timeout_s: float) -> None:
    """Until the search server counts `expected` documents behind the bench's alias (or the
    timeout passes, or the count cannot be read: then the bench goes on)."""
    url = f"{settings.es_url.rstrip('/')}/{settings.es_alias}/_count"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if int(json.loads(response.read())["count"]) >= expected:
                    return
        except (OSError, ValueError, KeyError):
            return
        time.sleep(0.5)
