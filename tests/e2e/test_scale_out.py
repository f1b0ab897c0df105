"""Two workers in one consumer group split the partitions and lose nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from engines.builder.data import sample_texts
from schemas import encode_event
from tests.e2e.conftest import Names, WorkerFactory
from tests.e2e.test_pipeline import _indexed_ids, _produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


async def test_two_workers_share_the_stream(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str
) -> None:
    first = workers.start()
    second = workers.start()
    await asyncio.sleep(8)  # let the group settle on two members before the burst
    texts = sample_texts(800, seed=3)
    records = [(f"g-{i}".encode(), encode_event(t, id=f"g-{i}")) for i, t in enumerate(texts)]
    await _produce(kafka_bootstrap, names.texts, records)

    ids = await _indexed_ids(es_url, names.alias, len(texts))
    assert sorted(ids) == sorted(f"g-{i}" for i in range(len(texts)))
    deadline = time.monotonic() + 30
    while True:
        done = [int(str((w.health() or {}).get("texts", 0))) for w in (first, second)]
        if sum(done) >= len(texts) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert all(n > 0 for n in done), f"both workers should take partitions: {done}"
    assert sum(done) >= len(texts)
